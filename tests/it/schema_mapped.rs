//! Schema changes through a mapped table pair: a column the config maps, added on
//! one node first while both applications write.

use super::schema_changes::owed;
use crate::harness::count;
use crate::harness::output_text;
use crate::harness::wait_for;
use std::time::Duration;

/// A mapped pair (legacy users on node a, modern accounts on node b) whose config
/// maps a new column, `phone` on a to `phone_number` on b, added on a first while
/// both applications write: b owes the values and gets them through the pairing
/// once it has the column, and later changes cross both ways under the mapping.
#[tokio::test]
async fn a_mapped_column_added_on_one_node_first_is_carried_once_the_other_has_it() {
    let (rig, a, b) = crate::harness::mapping::rig("[snapshot]\nmode = \"never\"\n").await;
    rig.edit_config(&[(
        r#"columns = [ { a = "name", b = "full_name" } ]"#,
        r#"columns = [ { a = "name", b = "full_name" }, { a = "phone", b = "phone_number" } ]"#,
    )]);
    a.batch_execute("ALTER TABLE users ADD COLUMN phone text")
        .await
        .unwrap();
    let check = rig.command(&["check"]);
    let said = output_text(&check);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("column phone of node a maps to phone_number, which node b lacks"),
        "{said}"
    );
    assert!(rig.command(&["setup"]).status.success());
    let d = rig.start();
    d.wait_applying(2).await;
    // Users with phones on a, accounts on b, and edits of both, from two writers.
    let (writer_a, writer_b) = (rig.client_a().await, rig.client_b().await);
    let legacy = tokio::spawn(async move {
        for i in 0..60 {
            writer_a
                .batch_execute(&format!(
                    "INSERT INTO users (email, name, phone) VALUES ('u{i}@legacy', 'U{i}', '+1-555-{i:04}');
                     UPDATE users SET phone = phone || '9', updated_at = clock_timestamp() AT TIME ZONE 'UTC'
                      WHERE email = 'u{}@legacy'",
                    i / 2
                ))
                .await
                .unwrap();
        }
    });
    let modern = tokio::spawn(async move {
        for i in 0..30 {
            writer_b
                .batch_execute(&format!(
                    "INSERT INTO accounts (id, email, full_name) VALUES (gen_random_uuid(), 'm{i}@modern', 'M{i}');
                     UPDATE accounts SET full_name = full_name || '!', updated_at = clock_timestamp()
                      WHERE email = 'u{i}@legacy'"
                ))
                .await
                .unwrap();
        }
    });
    legacy.await.unwrap();
    modern.await.unwrap();
    wait_for(
        "b to record the phones it is owed",
        Duration::from_secs(60),
        || {
            let b = &b;
            async move {
                let debt = (
                    "a".to_string(),
                    "public.accounts".to_string(),
                    "phone_number".to_string(),
                );
                (owed(b).await.contains(&debt)
                    && count(b, "SELECT count(*) FROM accounts WHERE email LIKE 'u%'").await == 60)
                    .then_some(())
            }
        },
    )
    .await;
    // The worker's look at the source keeps the debt: a has the column b lacks,
    // under its own name.
    wait_for("a look at the source", Duration::from_secs(60), || {
        let d = &d;
        async move {
            d.logs()
                .contains("are still owed: add the column there")
                .then_some(())
        }
    })
    .await;
    let debt = (
        "a".to_string(),
        "public.accounts".to_string(),
        "phone_number".to_string(),
    );
    assert!(owed(&b).await.contains(&debt), "{:?}", owed(&b).await);

    b.batch_execute("ALTER TABLE accounts ADD COLUMN phone_number text")
        .await
        .unwrap();
    wait_for("the debt settled", Duration::from_secs(60), || {
        let b = &b;
        async move { owed(b).await.is_empty().then_some(()) }
    })
    .await;
    // A phone set on b now crosses back to a under the mapping.
    b.batch_execute(
        "UPDATE accounts SET phone_number = '+44-20-0000', updated_at = clock_timestamp()
          WHERE email = 'u59@legacy'",
    )
    .await
    .unwrap();
    wait_for("b's phone on a", Duration::from_secs(60), || {
        let a = &a;
        async move {
            (count(a, "SELECT count(*) FROM users WHERE phone = '+44-20-0000'").await == 1)
                .then_some(())
        }
    })
    .await;
    // Every legacy phone is on its paired account.
    let pairs = crate::harness::mapping::pairs(&b, "public.accounts").await;
    let phones_a: Vec<(String, Option<String>)> = a
        .query(
            "SELECT id::text, phone FROM users WHERE email LIKE 'u%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(phones_a.len(), 60);
    for (id, phone) in phones_a {
        let account = &pairs[&id];
        let on_b: Option<String> = b
            .query_one(
                "SELECT phone_number FROM accounts WHERE id = $1::text::uuid",
                &[account],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(on_b, phone, "user {id} (account {account})");
        assert!(phone.is_some(), "user {id} lost its phone");
    }
    assert_eq!(d.stop().await, Some(0));
}
