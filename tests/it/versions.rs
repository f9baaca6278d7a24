//! The PostgreSQL versions the suite runs: node a's from `DUPLEX_PG_BIN`, node b's from
//! `DUPLEX_PG_BIN_B` (the pairs across major versions), each Debian's 15 when unset.
//! These tests make a matrix run fail when a node runs another version than the one
//! asked for, and check what only some versions have.

use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text,
                   updated_at timestamptz NOT NULL DEFAULT clock_timestamp());";

/// Each node's server is the version its binaries say, so a matrix entry tests what
/// it names.
#[tokio::test]
async fn each_node_runs_the_version_the_environment_names() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    for (node, cluster, client) in [
        ("a", rig.cluster, rig.client_a().await),
        ("b", rig.cluster_b, rig.client_b().await),
    ] {
        let num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            num / 10000,
            cluster.major as i32,
            "node {node} runs {num}, its binaries in {} say {}",
            cluster.bin.display(),
            cluster.major
        );
        eprintln!("node {node}: PostgreSQL {num}");
    }
    // Node b is on a cluster of its own exactly when it runs other binaries.
    let own_b =
        std::env::var_os("DUPLEX_PG_BIN_B").is_some_and(|b| b != Cluster::shared().bin.as_os_str());
    assert_eq!(!std::ptr::eq(rig.cluster_b, rig.cluster), own_b);
}
