-- 0005: ends a server process and waits for it to be gone, on every supported
-- version: PostgreSQL 14 has pg_terminate_backend(pid, timeout), 13 only the form
-- that signals and returns. duplex ends a session to free what it holds (a
-- replication origin, row locks, a lease), so the next step must find it gone.
CREATE OR REPLACE FUNCTION duplex.terminate_backend(target integer, timeout_ms integer)
RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout_ms * interval '1 millisecond';
BEGIN
    IF current_setting('server_version_num')::integer >= 140000 THEN
        RETURN pg_terminate_backend(target, timeout_ms::bigint);
    END IF;
    IF NOT pg_terminate_backend(target) THEN
        RETURN false;
    END IF;
    WHILE EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = target) LOOP
        IF clock_timestamp() > deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
    RETURN true;
END
$fn$;
