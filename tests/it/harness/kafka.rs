//! A Tansu broker (Kafka protocol; memory storage, or a SQLite file for a log that
//! survives a restart) for tests, and a reader of topics.

use super::{free_port, register, temp_dir, Cleanup};
use duplex::event::ChangeEvent;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MEMORY: &str = "memory://tansu/";

pub struct Broker {
    pub port: u16,
    /// Tansu's `--storage-engine`, and the directory it runs in (a SQLite file's
    /// path is taken relative to it).
    storage: (String, Option<PathBuf>),
    /// Killed at exit (see `harness::cleanup_at_exit`).
    _child: std::sync::Mutex<std::process::Child>,
}

/// Where the broker binary is: `DUPLEX_TANSU`, the dev-env cache, or PATH.
fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("DUPLEX_TANSU") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cached = PathBuf::from(home).join(".cache/duplex/tansu-0.6.0-sql/bin/tansu");
    if cached.exists() {
        cached
    } else {
        "tansu".into()
    }
}

impl Broker {
    pub fn shared() -> &'static Broker {
        static SHARED: OnceLock<Broker> = OnceLock::new();
        SHARED.get_or_init(Broker::start)
    }

    /// A broker of the test's own (memory storage), to restart or stop.
    pub fn start_own() -> Broker {
        Broker::start()
    }

    /// A broker of the test's own keeping its log in a SQLite file, so that
    /// [`Broker::restart`] brings it back with every topic and message.
    pub fn start_durable() -> Broker {
        let port = free_port();
        let storage = (
            "sqlite://tansu.db".into(),
            Some(temp_dir("duplex-tansu-log-")),
        );
        let child = Broker::spawn(port, port, &storage);
        Broker {
            port,
            storage,
            _child: std::sync::Mutex::new(child),
        }
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and storage.
    pub fn restart(&self) {
        self.kill();
        let fresh = Broker::spawn(self.port, self.port, &self.storage);
        *self._child.lock().unwrap() = fresh;
    }

    /// Stops the broker (SIGTERM, waiting for it to exit) and starts it again on the
    /// same port and storage, as a rolling restart does.
    pub fn restart_gracefully(&self) {
        {
            let mut child = self._child.lock().unwrap();
            // SAFETY: a plain syscall on a process this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let fresh = Broker::spawn(self.port, self.port, &self.storage);
        *self._child.lock().unwrap() = fresh;
    }

    fn kill(&self) {
        let mut child = self._child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the broker and starts a new one on the same port: memory storage, so it
    /// comes back without any topic or message.
    pub fn restart_empty(&self) {
        assert_eq!(self.storage.0, MEMORY, "a durable broker keeps its log");
        self.restart();
    }

    /// A broker of the test's own that tells clients to reach it at 127.0.0.1:`port`
    /// (a proxy in front of it). `brokers()` is then that address.
    pub fn start_behind(port: u16, listen: u16) -> Broker {
        let storage = (MEMORY.into(), None);
        let child = Broker::spawn(listen, port, &storage);
        Broker {
            port,
            storage,
            _child: std::sync::Mutex::new(child),
        }
    }

    fn start() -> Broker {
        let port = free_port();
        let storage = (MEMORY.into(), None);
        let child = Broker::spawn(port, port, &storage);
        Broker {
            port,
            storage,
            _child: std::sync::Mutex::new(child),
        }
    }

    fn spawn(
        port: u16,
        advertised: u16,
        (storage, cwd): &(String, Option<PathBuf>),
    ) -> std::process::Child {
        let dir = temp_dir("duplex-tansu-");
        let log = std::fs::File::create(dir.join("tansu.log")).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let mut command = Command::new(tansu_bin());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args([
                "--storage-engine",
                storage.as_str(),
                "--cluster-id",
                "duplex-test",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start tansu ({}): {e}; run scripts/dev-env install",
                    tansu_bin().display()
                )
            });
        register(Cleanup::Kill(child.id()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
        let brokers = self.brokers();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
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

    /// Writes `events` to `topic` partition 0, in order, as the reader would.
    /// Writes raw (key, value) messages to `topic` partition 0, in order: what any
    /// client of the broker could put there.
    pub fn produce_raw(&self, topic: &str, messages: &[(Vec<u8>, Vec<u8>)]) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
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

    pub fn produce(&self, topic: &str, events: &[ChangeEvent]) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
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
