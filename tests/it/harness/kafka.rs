//! Apache Kafka (KRaft, no ZooKeeper) for tests: a one-node cluster shared by the run,
//! clusters of a test's own (one node, or several with replicated topics), nodes killed
//! and restarted on their log, and a reader and writers of topics.
//!
//! The broker's jars come from Maven Central through `scripts/dev-env install`, which
//! writes their class path to `~/.cache/duplex/kafka-<version>/classpath`
//! (`DUPLEX_KAFKA_CLASSPATH` names another file). Each node is a JVM running
//! `kafka.Kafka` in combined broker and controller mode with its config, log and data in
//! a directory of its own, formatted by `kafka.tools.StorageTool` first.

mod admin;

use super::{free_port, register, temp_dir, Cleanup};
use duplex::event::ChangeEvent;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The version `scripts/dev-env install` resolves.
pub const KAFKA_VERSION: &str = "4.4.0";

/// The line a node logs once it serves clients.
const STARTED: &str = "Kafka Server started";

/// Logging to the node's `kafka.log`, at INFO (readiness is read from it).
const LOG4J: &str = "status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
";

/// The class path file: `DUPLEX_KAFKA_CLASSPATH`, else the dev-env cache.
fn classpath() -> String {
    let file = std::env::var("DUPLEX_KAFKA_CLASSPATH").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        format!("{home}/.cache/duplex/kafka-{KAFKA_VERSION}/classpath")
    });
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| {
            panic!("no Kafka class path at {file} ({e}): run scripts/dev-env install")
        })
        .trim()
        .to_string()
}

/// A JVM running one of Kafka's main classes: a small heap, and the C1 compiler only,
/// which starts a node in about half the CPU time (tests move little data).
fn java(main: &str, log4j: Option<&Path>) -> Command {
    let mut c = Command::new("java");
    if let Some(file) = log4j {
        c.arg(format!(
            "-Dlog4j2.configurationFile=file:{}",
            file.display()
        ));
    }
    let opts = std::env::var("DUPLEX_KAFKA_JAVA_OPTS").unwrap_or_else(|_| {
        "-Xms64m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss512k".into()
    });
    c.args(opts.split_whitespace())
        .arg("-Djava.awt.headless=true")
        .arg("-cp")
        .arg(classpath())
        .arg(main);
    c
}

/// A random KRaft cluster id (16 bytes, unpadded base64url).
fn cluster_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// How a cluster's nodes are configured beyond the defaults.
#[derive(Clone, Default)]
pub struct Settings {
    /// Extra `server.properties` lines, for every node.
    pub properties: Vec<(String, String)>,
    /// The client listener's security protocol and its own lines (`None`: PLAINTEXT).
    pub listener: Option<String>,
    /// Arguments added to `StorageTool format` (e.g. `--add-scram`).
    pub format_args: Vec<String>,
}

/// One node of a cluster: its ports, directory and process.
pub struct Node {
    pub id: u32,
    /// Where it listens for clients.
    pub listen: u16,
    /// What it tells clients to connect to (a proxy in front of it, or `listen`).
    pub advertised: u16,
    pub controller: u16,
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    /// What the node logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&self) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = java("kafka.Kafka", Some(&self.dir.join("log4j2.properties")))
            .arg(self.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start java for Kafka: {e}; run scripts/dev-env install")
            });
        register(Cleanup::Kill(child.id()));
        *self.child.lock().unwrap() = Some(child);
    }

    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = self.log();
            if log.contains(STARTED) {
                return;
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .is_none_or(|c| c.try_wait().unwrap().is_some());
            assert!(
                !exited && Instant::now() < deadline,
                "Kafka node {} did not start:\n{log}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: whatever the JVM had not written to the page cache is gone (the page
    /// cache itself survives, as in a process crash).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
            super::forget(child.id());
        }
    }

    /// SIGTERM, waiting for the controlled shutdown to end.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: a plain syscall on a process this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            super::forget(child.id());
        }
    }

    /// Starts the node again on its log and waits until it serves.
    pub fn start(&self) {
        self.spawn();
        self.wait_started();
    }
}

/// A Kafka cluster of one or more nodes, each broker and controller at once.
pub struct Broker {
    pub nodes: Vec<Node>,
    cluster_id: String,
    settings: Settings,
}

impl Broker {
    /// The one-node cluster shared by the tests of a run.
    pub fn shared() -> &'static Broker {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        SHARED.get_or_init(Broker::start_own)
    }

    /// A one-node cluster of the test's own, to restart, empty or stop.
    pub fn start_own() -> Broker {
        Broker::start_cluster(1, Settings::default())
    }

    /// A one-node cluster that tells clients to reach it at 127.0.0.1:`port` (a proxy
    /// in front of it) while it listens on `listen`. `brokers()` is then `port`.
    pub fn start_behind(port: u16, listen: u16) -> Broker {
        Broker::start_nodes(vec![(listen, port)], Settings::default())
    }

    /// `count` nodes, each broker and controller, with `settings`.
    pub fn start_cluster(count: usize, settings: Settings) -> Broker {
        let ports = (0..count)
            .map(|_| {
                let p = free_port();
                (p, p)
            })
            .collect();
        Broker::start_nodes(ports, settings)
    }

    fn start_nodes(ports: Vec<(u16, u16)>, settings: Settings) -> Broker {
        let nodes: Vec<Node> = ports
            .into_iter()
            .enumerate()
            .map(|(i, (listen, advertised))| Node {
                id: i as u32 + 1,
                listen,
                advertised,
                controller: free_port(),
                dir: temp_dir("duplex-kafka-"),
                child: Mutex::new(None),
            })
            .collect();
        let broker = Broker {
            nodes,
            cluster_id: cluster_id(),
            settings,
        };
        for node in &broker.nodes {
            broker.write_config(node);
            broker.format(node);
        }
        for node in &broker.nodes {
            node.spawn();
        }
        for node in &broker.nodes {
            node.wait_started();
        }
        broker
    }

    fn write_config(&self, node: &Node) {
        let voters: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller))
            .collect();
        let replicas = self.nodes.len().min(3);
        let protocol = self.settings.listener.as_deref().unwrap_or("PLAINTEXT");
        let mut props = vec![
            ("process.roles", "broker,controller".to_string()),
            ("node.id", node.id.to_string()),
            ("controller.quorum.voters", voters.join(",")),
            (
                "listeners",
                format!(
                    "CLIENT://127.0.0.1:{},CONTROLLER://127.0.0.1:{}",
                    node.listen, node.controller
                ),
            ),
            (
                "advertised.listeners",
                format!("CLIENT://127.0.0.1:{}", node.advertised),
            ),
            ("controller.listener.names", "CONTROLLER".into()),
            ("inter.broker.listener.name", "INTERNAL".into()),
            (
                "listener.security.protocol.map",
                format!("CONTROLLER:PLAINTEXT,CLIENT:{protocol},INTERNAL:PLAINTEXT"),
            ),
            ("log.dirs", node.dir.join("data").display().to_string()),
            ("num.partitions", "1".into()),
            ("default.replication.factor", replicas.to_string()),
            ("offsets.topic.replication.factor", replicas.to_string()),
            (
                "transaction.state.log.replication.factor",
                replicas.to_string(),
            ),
            ("transaction.state.log.min.isr", "1".into()),
            (
                "share.coordinator.state.topic.replication.factor",
                replicas.to_string(),
            ),
            ("share.coordinator.state.topic.min.isr", "1".into()),
            ("group.initial.rebalance.delay.ms", "0".into()),
            ("unclean.leader.election.enable", "false".into()),
            // Room for the multi-megabyte messages some tests write (Kafka's default
            // is 1 MB); a test of the limit sets the producer's.
            ("message.max.bytes", "8388608".into()),
        ];
        // Brokers talk to each other on a listener of their own, plain, so that
        // only the client listener carries the settings under test.
        let internal = free_port();
        props.iter_mut().for_each(|(k, v)| {
            if *k == "listeners" {
                v.push_str(&format!(",INTERNAL://127.0.0.1:{internal}"));
            }
            if *k == "advertised.listeners" {
                v.push_str(&format!(",INTERNAL://127.0.0.1:{internal}"));
            }
        });
        let mut text: String = props.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        for (k, v) in &self.settings.properties {
            text.push_str(&format!("{k}={v}\n"));
        }
        std::fs::write(node.dir.join("server.properties"), text).unwrap();
        std::fs::write(node.dir.join("log4j2.properties"), LOG4J).unwrap();
    }

    fn format(&self, node: &Node) {
        let out = java("kafka.tools.StorageTool", None)
            // `=`: a random id may begin with `-`, which would read as an option.
            .args(["format", "--ignore-formatted"])
            .arg(format!("--cluster-id={}", self.cluster_id))
            .arg("-c")
            .arg(node.dir.join("server.properties"))
            .args(&self.settings.format_args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "formatting Kafka's storage failed: {}",
            super::output_text(&out)
        );
    }

    /// The bootstrap servers, as duplex's `kafka.brokers` takes them.
    pub fn brokers(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.advertised))
            .collect();
        addrs.join(",")
    }

    /// The first node: the whole of a one-node cluster.
    fn only(&self) -> &Node {
        &self.nodes[0]
    }

    /// Kills the broker (SIGKILL) and starts it again on its log.
    pub fn restart(&self) {
        self.only().kill();
        self.only().start();
    }

    /// Stops the broker (SIGTERM, waiting for it to exit) and starts it again on its
    /// log, as a rolling restart does.
    pub fn restart_gracefully(&self) {
        self.only().stop();
        self.only().start();
    }

    /// Kills the broker and starts it again with an empty log (the same cluster id): a
    /// broker whose disk was lost, without any topic or message.
    pub fn restart_empty(&self) {
        let node = self.only();
        node.kill();
        std::fs::remove_dir_all(node.dir.join("data")).unwrap();
        self.format(node);
        node.start();
    }

    /// A client config for this cluster, with the settings a test client needs.
    fn client(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", self.brokers());
        cc
    }

    /// The topic's partition 0 low and high watermarks: the first offset it holds and
    /// the next it will give.
    pub fn watermarks(&self, topic: &str) -> (i64, i64) {
        let consumer: BaseConsumer = self.client().create().unwrap();
        consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .unwrap()
    }

    /// Deletes the records of `topic` partition 0 before `offset` (what retention does
    /// to a log's head).
    pub async fn delete_records_before(&self, topic: &str, offset: i64) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
            .unwrap();
        let done = admin
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .unwrap();
        for e in done.elements() {
            assert!(e.error().is_ok(), "deleting records: {:?}", e.error());
        }
    }

    /// Deletes `topic` (as an operator's `kafka-topics --delete` would) and waits until
    /// the cluster no longer lists it.
    pub async fn delete_topic(&self, topic: &str) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        for r in admin
            .delete_topics(&[topic], &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap();
        }
        let consumer: BaseConsumer = self.client().create().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .unwrap();
            if md.topics().iter().all(|t| t.error().is_some()) {
                return;
            }
            assert!(Instant::now() < deadline, "topic {topic} still listed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads `topic` partition 0 from the start until `done` holds for what was read,
    /// or `timeout` passes; returns the decoded events. `done` is asked whenever the
    /// reader has caught up and every 1000 events, so it may be costly.
    pub async fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        done: impl Fn(&[ChangeEvent]) -> bool + Send + 'static,
    ) -> Vec<ChangeEvent> {
        let mut cc = self.client();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = cc
                .set("group.id", "duplex-tests")
                .set("enable.auto.commit", "false")
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Beginning)
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let deadline = Instant::now() + timeout;
            let mut events = Vec::new();
            while Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        let payload = m.payload().expect("message without payload");
                        events.push(ChangeEvent::from_json(payload).expect("not an envelope"));
                        if events.len() % 1000 == 0 && done(&events) {
                            break;
                        }
                    }
                    Some(Err(_)) | None => {
                        if done(&events) {
                            break;
                        }
                    }
                }
            }
            events
        })
        .await
        .unwrap()
    }

    /// Writes raw (key, value) messages to `topic` partition 0, in order: what any
    /// client of the broker could put there.
    pub fn produce_raw(&self, topic: &str, messages: &[(Vec<u8>, Vec<u8>)]) {
        let producer: BaseProducer = self
            .client()
            .set("message.max.bytes", "8000000")
            .create()
            .unwrap();
        for (key, payload) in messages {
            producer
                .send(BaseRecord::to(topic).partition(0).key(key).payload(payload))
                .unwrap();
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Writes `events` to `topic` partition 0, in order, as the reader would.
    pub fn produce(&self, topic: &str, events: &[ChangeEvent]) {
        let producer: BaseProducer = self
            .client()
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        for ev in events {
            let (key, payload) = (ev.kafka_key(), ev.to_json());
            producer
                .send(
                    BaseRecord::to(topic)
                        .partition(0)
                        .key(&key)
                        .payload(&payload),
                )
                .unwrap();
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }
}

/// Runs a Kafka command-line tool's main class (e.g. `org.apache.kafka.tools.AclCommand`)
/// and returns its output; fails the test if it fails.
pub fn kafka_tool(main: &str, args: &[&str], dir: &Path) -> String {
    let out = java(main, None)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = super::output_text(&out);
    assert!(out.status.success(), "{main} {args:?} failed: {text}");
    text
}
