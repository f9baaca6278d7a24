//! Large values stored out of line (TOAST) that a change did not touch: PostgreSQL does
//! not send them, and the target must still end with every value the source has,
//! whichever versions of a key arrive together.

use crate::harness::count;
use crate::harness::duplex::Rig;
use crate::harness::pg::Cluster;
use crate::harness::tables::converge;
use crate::harness::wait_for;
use std::time::Duration;

const DDL: &str = "CREATE TABLE items (id int PRIMARY KEY, val text, body text,
                     updated_at timestamptz NOT NULL DEFAULT clock_timestamp());
                   ALTER TABLE items ALTER body SET STORAGE EXTERNAL;";

#[tokio::test]
async fn unchanged_toast_values_survive_batching_and_key_changes() {
    let rig = Rig::new(DDL, &["public.items"], "").await;
    assert!(rig.command(&["setup"]).status.success());
    let cl = Cluster::shared();
    let (a, b) = (cl.client(&rig.db_a).await, rig.client_b().await);
    let d = rig.start();
    // 10 kB bodies, stored out of line.
    a.batch_execute(
        "INSERT INTO items (id, val, body) VALUES
           (1, 'one', repeat('1', 10000)), (3, 'three', repeat('3', 10000))",
    )
    .await
    .unwrap();
    wait_for("rows 1 and 3 on b", Duration::from_secs(30), || async {
        (count(&b, "SELECT count(*) FROM items").await == 2).then_some(())
    })
    .await;
    assert_eq!(d.stop().await, Some(0));
    // While duplex is down, so that all of it arrives in one batch:
    a.batch_execute(
        // a) a new body, then an update that leaves the body alone
        "UPDATE items SET body = repeat('x', 10000), updated_at = clock_timestamp() WHERE id = 1;
         UPDATE items SET val = 'one again', updated_at = clock_timestamp() WHERE id = 1;
         -- b) a row b does not have, then an update that leaves its body alone
         INSERT INTO items (id, val, body) VALUES (2, 'two', repeat('2', 10000));
         UPDATE items SET val = 'two again', updated_at = clock_timestamp() WHERE id = 2;
         -- c) a key change that leaves the body alone
         UPDATE items SET id = 4, updated_at = clock_timestamp() WHERE id = 3;",
    )
    .await
    .unwrap();
    let d = rig.start();
    converge(&a, &b, &["items"], Duration::from_secs(30)).await;
    let bodies =
        "SELECT string_agg(id || ':' || left(body, 1) || length(body), ',' ORDER BY id) FROM items";
    let got: String = b.query_one(bodies, &[]).await.unwrap().get(0);
    assert_eq!(got, "1:x10000,2:210000,4:310000");
    assert_eq!(d.stop().await, Some(0));
}
