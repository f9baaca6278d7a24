//! Least privilege: duplex runs as a role that is not a superuser, with exactly the
//! grants README "What duplex needs on each node" lists, and converges under
//! concurrent writes; `duplex check` names each grant such a role lacks.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::unique;
use crate::harness::workload::{converges_under_workloads, rig_before_setup};

/// The grants of README "What duplex needs on each node", on database `db`, for a
/// role that owns the configured tables.
fn grants(role: &str, db: &str) -> String {
    format!(
        "GRANT CREATE ON DATABASE {db} TO {role};
         GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text),
           pg_replication_origin_create(text) TO {role};
         GRANT SET ON PARAMETER session_replication_role, deadlock_timeout TO {role};"
    )
}

/// A `LOGIN REPLICATION` role (not a superuser) owning the test's tables on both
/// nodes, with the config's URLs switched to it. Returns the role.
async fn as_least_privileged(rig: &Rig) -> String {
    let role = unique("duplex_role");
    let cl = Cluster::shared();
    for (n, cluster) in [cl, rig.cluster_b].into_iter().enumerate() {
        if n == 1 && std::ptr::eq(cluster, cl) {
            break;
        }
        cluster
            .client("postgres")
            .await
            .batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION"))
            .await
            .unwrap();
    }
    for (cl, db) in [(cl, &rig.db_a), (rig.cluster_b, &rig.db_b)] {
        let c = cl.client(db).await;
        c.batch_execute(&grants(&role, db)).await.unwrap();
        // duplex publishes the configured tables and adds its triggers to them: the
        // role owns them. The apply log (the test's own bookkeeping, written by a
        // trigger in duplex's sessions) needs INSERT and the origin check.
        c.batch_execute(&format!(
            "ALTER TABLE items OWNER TO {role}; ALTER TABLE parent OWNER TO {role};
             ALTER TABLE child OWNER TO {role}; ALTER TABLE users OWNER TO {role};
             GRANT INSERT ON apply_log TO {role};
             GRANT EXECUTE ON FUNCTION pg_replication_origin_session_is_setup() TO {role};"
        ))
        .await
        .unwrap();
    }
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        cfg.replace("postgres://postgres@", &format!("postgres://{role}@")),
    )
    .unwrap();
    role
}

#[tokio::test]
async fn a_least_privileged_role_converges_under_concurrent_writes() {
    let rig = rig_before_setup().await;
    as_least_privileged(&rig).await;
    let check = rig.command(&["check"]);
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(0), "{said}");
    assert!(rig.command(&["setup"]).status.success());
    let (d, _) = converges_under_workloads(&rig, 15, 500).await;
    assert_eq!(d.stop().await, Some(0));
}

#[tokio::test]
async fn check_names_each_missing_grant() {
    let rig = rig_before_setup().await;
    let role = as_least_privileged(&rig).await;
    let cl = Cluster::shared();
    let b = rig.client_b().await;
    b.batch_execute(&format!(
        "REVOKE SET ON PARAMETER session_replication_role, deadlock_timeout FROM {role};
         REVOKE EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) FROM {role};
         ALTER TABLE child OWNER TO postgres;"
    ))
    .await
    .unwrap();
    let a = cl.client(&rig.db_a).await;
    a.batch_execute(&format!(
        "REVOKE CREATE ON DATABASE {} FROM {role}",
        rig.db_a
    ))
    .await
    .unwrap();
    let check = rig.command(&["check"]);
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{said}");
    for missing in [
        "session_replication_role",
        "pg_replication_origin_session_setup",
        "public.child",
        "GRANT CREATE ON DATABASE",
    ] {
        assert!(said.contains(missing), "{missing} not named:\n{said}");
    }
}
