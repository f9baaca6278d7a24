-- Runs once on each node's first start (docker-entrypoint-initdb.d), as the
-- superuser in database app: the demo table and a duplex role with what
-- README "What duplex needs on each node" asks of a non-superuser.
CREATE ROLE duplex LOGIN REPLICATION PASSWORD 'duplex';
GRANT CREATE ON DATABASE app TO duplex;
GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text),
  pg_replication_origin_create(text) TO duplex;
GRANT SET ON PARAMETER session_replication_role, deadlock_timeout TO duplex;

-- duplex publishes the table and adds its triggers: the role owns it.
CREATE TABLE public.items (
  id bigint PRIMARY KEY,
  name text,
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE public.items OWNER TO duplex;
