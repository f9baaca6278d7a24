//! A cluster as an operator's tools see it: a partition's leader and in-sync replicas,
//! a topic's high watermark while its leader may be down, its effective configs, and
//! topics created or altered with settings of the test's choosing.

use super::{Broker, Node};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::BTreeMap;
use std::time::Duration;

/// Partition 0 of a topic, as the cluster's metadata describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionState {
    /// The leader's node id (-1 while there is none).
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// How long one question to the cluster may take: short, so that polling while a node
/// is down measures the outage rather than the timeout.
const ASK_TIMEOUT: Duration = Duration::from_millis(500);

impl Broker {
    /// The node with id `id` (as metadata names leaders and replicas).
    pub fn node(&self, id: i32) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id as i32 == id)
            .unwrap_or_else(|| panic!("no node {id} in the cluster"))
    }

    fn admin(&self) -> AdminClient<DefaultClientContext> {
        self.client().create().unwrap()
    }

    /// Partition 0 of `topic`; `None` when metadata cannot be read or lacks it.
    pub async fn partition(&self, topic: &str) -> Option<PartitionState> {
        let (cc, topic) = (self.client(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = cc.create().ok()?;
            let metadata = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .ok()?;
            let t = metadata.topics().first().filter(|t| t.error().is_none())?;
            let p = t.partitions().iter().find(|p| p.id() == 0)?;
            Some(PartitionState {
                leader: p.leader(),
                replicas: p.replicas().to_vec(),
                isr: p.isr().to_vec(),
            })
        })
        .await
        .unwrap()
    }

    /// `topic` partition 0's high watermark (the offset after the last message every
    /// in-sync replica has, so acknowledged under `acks=all`); `None` while its leader
    /// does not answer.
    pub async fn high_watermark(&self, topic: &str) -> Option<i64> {
        let (cc, topic) = (self.client(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = cc.create().ok()?;
            consumer
                .fetch_watermarks(&topic, 0, ASK_TIMEOUT)
                .ok()
                .map(|(_, high)| high)
        })
        .await
        .unwrap()
    }

    /// `topic`'s effective configs (its own, else the brokers' defaults).
    pub async fn topic_configs(&self, topic: &str) -> BTreeMap<String, String> {
        let described = self
            .admin()
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
            .await
            .unwrap();
        let resource = described.into_iter().next().unwrap().unwrap();
        resource
            .entries
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect()
    }

    /// Creates `topic` with one partition, `replication` replicas and `configs`.
    pub async fn create_topic(&self, topic: &str, replication: i32, configs: &[(&str, &str)]) {
        let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication));
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let done = self
            .admin()
            .create_topics([&new], &AdminOptions::new())
            .await
            .unwrap();
        for r in done {
            r.unwrap_or_else(|e| panic!("creating topic {topic}: {e:?}"));
        }
    }

    /// Replaces `topic`'s own configs with `configs` (the others return to the
    /// brokers' defaults).
    pub async fn alter_topic(&self, topic: &str, configs: &[(&str, &str)]) {
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in configs {
            alter = alter.set(k, v);
        }
        let done = self
            .admin()
            .alter_configs([&alter], &AdminOptions::new())
            .await
            .unwrap();
        for r in done {
            r.unwrap_or_else(|e| panic!("altering topic {topic}: {e:?}"));
        }
    }
}
