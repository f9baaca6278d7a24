//! What duplex's Kafka principal may do, against what duplex's clients need (README
//! "A secured Kafka cluster"): WRITE on each source node's topic, READ on the topic of
//! each direction's source, CREATE on a topic that does not exist yet, DESCRIBE on each
//! direction's consumer group (librdkafka looks up the group's coordinator, although
//! duplex commits no offsets), and WRITE on the dead-letter topics with
//! `sync.on_error = "dead_letter"`. One line per missing grant, naming the principal,
//! the resource and the operation, with the kafka-acls.sh command that grants it.
//!
//! The broker tells a topic's authorized operations only once it exists, so before
//! duplex first started only CREATE is checked (by a validate-only creation).

use crate::config::{Config, OnError};
use crate::kafka::access::{self, TopicAccess, CREATE, DESCRIBE, READ, WRITE};
use crate::kafka::{apply_group, client_config};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long each question to the brokers may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    Topic(String),
    Group(String),
}

/// One operation duplex needs on one resource, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    resource: Resource,
    op: i32,
    why: String,
}

/// Every operation duplex's clients need under `cfg` (CREATE aside: it is needed only
/// on a topic that does not exist).
fn needs(cfg: &Config) -> Vec<Need> {
    let mut needs = Vec::new();
    for dir in cfg.directions().unwrap_or_default() {
        let topic = Resource::Topic(cfg.topic(&dir.from));
        needs.push(Need {
            resource: topic.clone(),
            op: WRITE,
            why: format!("node {}'s changes are written there", dir.from),
        });
        needs.push(Need {
            resource: topic,
            op: READ,
            why: format!("direction {dir} reads it"),
        });
        needs.push(Need {
            resource: Resource::Group(apply_group(&dir)),
            op: DESCRIBE,
            why: format!("direction {dir}'s consumer looks up the group's coordinator"),
        });
        if cfg.sync.on_error == OnError::DeadLetter {
            needs.push(Need {
                resource: Resource::Topic(crate::kafka::dead_letter_topic(cfg, &dir)),
                op: WRITE,
                why: format!("direction {dir} sets aside there the events it cannot apply"),
            });
        }
    }
    needs
}

/// The missing grant as a line for the operator.
fn line(cfg: &Config, resource: &Resource, op: i32, why: &str) -> String {
    let principal = cfg
        .kafka
        .properties
        .get("sasl.username")
        .map(|u| format!("User:{u}"));
    let (kind, name) = match resource {
        Resource::Topic(t) => ("topic", t),
        Resource::Group(g) => ("group", g),
    };
    let op_name = access::operation_name(op);
    format!(
        "kafka: principal {who} may not {op} {kind} {name} ({why}); grant it with: kafka-acls.sh --bootstrap-server {brokers} --command-config <admin client properties> --add --allow-principal {principal} --operation {op_name} --{kind} {name}",
        who = principal.as_deref().unwrap_or("of duplex"),
        op = op_name.to_ascii_uppercase(),
        brokers = cfg.kafka.brokers,
        principal = principal.as_deref().unwrap_or("User:<duplex's principal>"),
    )
}

/// One line per grant duplex's principal lacks; empty when it has them all.
pub(super) async fn problems(cfg: &Config) -> Vec<String> {
    let needs = needs(cfg);
    let mut topics: Vec<String> = Vec::new();
    let mut groups: Vec<String> = Vec::new();
    for n in &needs {
        match &n.resource {
            Resource::Topic(t) if !topics.contains(t) => topics.push(t.clone()),
            Resource::Group(g) if !groups.contains(g) => groups.push(g.clone()),
            _ => {}
        }
    }
    let asked = ask(cfg, topics, groups).await;
    let (topic_access, group_errors) = match asked {
        Ok(answers) => answers,
        Err(e) => {
            return vec![format!(
                "kafka: asking the brokers what duplex's principal may do failed: {e}"
            )]
        }
    };
    let mut problems = Vec::new();
    let mut missing_topics = Vec::new();
    for n in &needs {
        let denied = match &n.resource {
            Resource::Topic(t) => match topic_access.get(t) {
                Some(TopicAccess::Exists(Some(ops))) => !ops.contains(&n.op),
                // READ and WRITE imply DESCRIBE: without it, neither is granted.
                Some(TopicAccess::Denied) => true,
                Some(TopicAccess::Missing) => {
                    if !missing_topics.contains(t) {
                        missing_topics.push(t.clone());
                    }
                    false
                }
                Some(TopicAccess::Failed(code)) => {
                    let p = format!("kafka: describing topic {t} failed: {code}");
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                    false
                }
                Some(TopicAccess::Exists(None)) | None => false,
            },
            Resource::Group(g) => matches!(
                group_errors.get(g),
                Some(Some(RDKafkaErrorCode::GroupAuthorizationFailed))
            ),
        };
        if denied {
            problems.push(line(cfg, &n.resource, n.op, &n.why));
        }
    }
    for topic in missing_topics {
        match may_create(cfg, &topic).await {
            Ok(true) => {}
            Ok(false) => problems.push(line(
                cfg,
                &Resource::Topic(topic),
                CREATE,
                "it does not exist yet and duplex creates it at its first start; or create it beforehand, with one partition",
            )),
            Err(e) => problems.push(format!(
                "kafka: checking whether duplex may create topic {topic} failed: {e}"
            )),
        }
    }
    problems
}

type Answers = (
    BTreeMap<String, TopicAccess>,
    BTreeMap<String, Option<RDKafkaErrorCode>>,
);

/// What the brokers say about `topics` and `groups`.
async fn ask(cfg: &Config, topics: Vec<String>, groups: Vec<String>) -> Result<Answers, String> {
    let cc = client_config(&cfg.kafka);
    tokio::task::spawn_blocking(move || {
        let admin: AdminClient<DefaultClientContext> = cc.create()?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let t = access::topics(admin.inner(), &topics, TIMEOUT)?;
        let g = access::groups(admin.inner(), &groups, TIMEOUT)?;
        Ok::<_, KafkaError>((t, g))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Whether the brokers would let duplex create `topic`, asked by a creation they only
/// validate.
async fn may_create(cfg: &Config, topic: &str) -> Result<bool, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(&cfg.kafka).create()?;
    let new = NewTopic::new(
        topic,
        1,
        TopicReplication::Fixed(cfg.kafka.replication_factor),
    );
    let opts = AdminOptions::new()
        .validate_only(true)
        .request_timeout(Some(TIMEOUT));
    for result in admin.create_topics([&new], &opts).await? {
        if let Err((_, RDKafkaErrorCode::TopicAuthorizationFailed)) = result {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[nodes.a]
url = "postgres://duplex@a/app"
[nodes.b]
url = "postgres://duplex@b/app"
[kafka]
brokers = "k1:9093"
topic_prefix = "dx"
[kafka.properties]
"sasl.username" = "svc"
[[tables]]
name = "public.items"
{extra}
"#
        );
        Config::parse(&text).unwrap()
    }

    #[test]
    fn both_directions_need_write_and_read_on_each_topic_and_their_groups() {
        let needs = needs(&config(""));
        let ops = |r: Resource| -> Vec<i32> {
            needs
                .iter()
                .filter(|n| n.resource == r)
                .map(|n| n.op)
                .collect()
        };
        assert_eq!(ops(Resource::Topic("dx.a.changes".into())), [WRITE, READ]);
        assert_eq!(ops(Resource::Topic("dx.b.changes".into())), [WRITE, READ]);
        assert_eq!(ops(Resource::Group("duplex-a_to_b".into())), [DESCRIBE]);
        assert_eq!(ops(Resource::Group("duplex-b_to_a".into())), [DESCRIBE]);
        assert_eq!(needs.len(), 6);
    }

    #[test]
    fn dead_letters_need_write_on_the_dead_letter_topic() {
        let cfg = config("[sync]\ndirection = \"a_to_b\"\non_error = \"dead_letter\"");
        let topics: Vec<(Resource, i32)> = needs(&cfg)
            .into_iter()
            .map(|n| (n.resource, n.op))
            .collect();
        assert_eq!(
            topics,
            [
                (Resource::Topic("dx.a.changes".into()), WRITE),
                (Resource::Topic("dx.a.changes".into()), READ),
                (Resource::Group("duplex-a_to_b".into()), DESCRIBE),
                (Resource::Topic("dx.a.dlq".into()), WRITE),
            ]
        );
    }

    #[test]
    fn a_line_names_principal_resource_operation_and_the_grant() {
        let cfg = config("");
        let l = line(&cfg, &Resource::Topic("dx.a.changes".into()), WRITE, "why");
        assert!(
            l.contains("principal User:svc may not WRITE topic dx.a.changes (why)"),
            "{l}"
        );
        assert!(
            l.ends_with("--bootstrap-server k1:9093 --command-config <admin client properties> --add --allow-principal User:svc --operation Write --topic dx.a.changes"),
            "{l}"
        );
        let l = line(
            &cfg,
            &Resource::Group("duplex-a_to_b".into()),
            DESCRIBE,
            "w",
        );
        assert!(
            l.ends_with("--operation Describe --group duplex-a_to_b"),
            "{l}"
        );
    }
}
