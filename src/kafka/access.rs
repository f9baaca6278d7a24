//! What the brokers let duplex's principal do, for `duplex check`: each topic's
//! authorized operations (Kafka's Metadata request with
//! `IncludeTopicAuthorizedOperations`, librdkafka's `rd_kafka_DescribeTopics`) and
//! whether it may describe a consumer group (`rd_kafka_DescribeConsumerGroups`).
//! rust-rdkafka wraps neither, so this calls librdkafka's C API through
//! `rdkafka::bindings`; everything the result holds is copied into owned values before
//! the result is freed, and the broker's operation codes are read as plain integers.

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::time::Duration;

/// An ACL operation, as librdkafka numbers them (`rd_kafka_AclOperation_t`).
pub const READ: i32 = 3;
pub const WRITE: i32 = 4;
pub const CREATE: i32 = 5;
pub const DESCRIBE: i32 = 8;

/// The name kafka-acls.sh takes for an operation.
pub fn operation_name(op: i32) -> &'static str {
    match op {
        READ => "Read",
        WRITE => "Write",
        CREATE => "Create",
        DESCRIBE => "Describe",
        _ => "?",
    }
}

/// What the broker said about one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicAccess {
    /// It exists; the operations the principal may perform on it, if the broker says
    /// (brokers before Kafka 2.3 do not).
    Exists(Option<Vec<i32>>),
    /// It does not exist (and the principal may describe it).
    Missing,
    /// The principal may not describe it: it may or may not exist.
    Denied,
    /// Another error.
    Failed(RDKafkaErrorCode),
}

/// Frees a librdkafka object when dropped.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from librdkafka's constructor for this
            // destructor and is freed once, here.
            unsafe { (self.1)(self.0) }
        }
    }
}

/// A copy of a C string librdkafka owns; empty for null.
///
/// # Safety
/// `s` is null or a NUL-terminated string that lives for this call.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        String::new()
    } else {
        CStr::from_ptr(s).to_string_lossy().into_owned()
    }
}

/// An error object's code; `None` for null (no error).
///
/// # Safety
/// `e` is null or a live `rd_kafka_error_t`.
unsafe fn code_of(e: *const rd::rd_kafka_error_t) -> Option<RDKafkaErrorCode> {
    (!e.is_null()).then(|| RDKafkaErrorCode::from(rd::rd_kafka_error_code(e)))
}

/// Runs one admin request of kind `op` on a queue of its own: `send` issues it with the
/// options and queue, and `read` copies what it needs out of the result event before
/// the event is freed. The request may take `timeout`.
fn request<C: ClientContext, T>(
    client: &Client<C>,
    op: rd::rd_kafka_admin_op_t,
    authorized_operations: bool,
    timeout: Duration,
    send: impl FnOnce(*mut rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
    read: impl FnOnce(*mut rd::rd_kafka_event_t) -> T,
) -> Result<T, KafkaError> {
    let rk = client.native_ptr();
    let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: `rk` is the live client `client` owns, for the whole call; every object
    // made here is freed by its `Owned` guard after its last use (the queue after the
    // event it delivered, the options after the request took a copy of them).
    unsafe {
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(rk, op),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if authorized_operations {
            let e = rd::rd_kafka_AdminOptions_set_include_authorized_operations(options.0, 1);
            if !e.is_null() {
                let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(e));
                rd::rd_kafka_error_destroy(e);
                return Err(KafkaError::AdminOp(code));
            }
        }
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        send(options.0, queue.0);
        // The request ends (in a timeout at worst) after `timeout`; the margin is for
        // the result to arrive.
        let event = Owned(
            rd::rd_kafka_queue_poll(queue.0, ms.saturating_add(2000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return Err(KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut));
        }
        let err = rd::rd_kafka_event_error(event.0);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(KafkaError::AdminOp(RDKafkaErrorCode::from(err)));
        }
        Ok(read(event.0))
    }
}

/// C strings of `names` (which never hold NUL: they are topic and group names from
/// the config) and an array of pointers to them, kept alive together.
fn c_names(names: &[&str]) -> (Vec<CString>, Vec<*const c_char>) {
    let owned: Vec<CString> = names
        .iter()
        .map(|n| CString::new(n.replace('\0', "")).unwrap_or_default())
        .collect();
    let ptrs = owned.iter().map(|c| c.as_ptr()).collect();
    (owned, ptrs)
}

/// What the broker says `client`'s principal may do with each of `topics`.
pub fn topics<C: ClientContext>(
    client: &Client<C>,
    topics: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, TopicAccess>, KafkaError> {
    let (_names, mut ptrs) = c_names(topics);
    // SAFETY: the collection copies the names; `ptrs` and `_names` outlive the call.
    let collection = Owned(
        unsafe { rd::rd_kafka_TopicCollection_of_topic_names(ptrs.as_mut_ptr(), ptrs.len()) },
        rd::rd_kafka_TopicCollection_destroy,
    );
    let rk = client.native_ptr();
    request(
        client,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
        true,
        timeout,
        // SAFETY: live client, collection, options and queue (see `request`).
        |options, queue| unsafe { rd::rd_kafka_DescribeTopics(rk, collection.0, options, queue) },
        // SAFETY: the event is a live DescribeTopics result: its arrays hold `cnt`
        // valid pointers, and each description's fields live as long as the event.
        |event| unsafe {
            let mut out = BTreeMap::new();
            let result = rd::rd_kafka_event_DescribeTopics_result(event);
            if result.is_null() {
                return out;
            }
            let mut cnt = 0;
            let descs = rd::rd_kafka_DescribeTopics_result_topics(result, &mut cnt);
            if descs.is_null() {
                return out;
            }
            for &desc in std::slice::from_raw_parts(descs, cnt) {
                let name = text(rd::rd_kafka_TopicDescription_name(desc));
                let access = match code_of(rd::rd_kafka_TopicDescription_error(desc)) {
                    None => {
                        let mut n = 0;
                        let ops = rd::rd_kafka_TopicDescription_authorized_operations(desc, &mut n);
                        // Read as integers: a value librdkafka may add later is no
                        // variant of the Rust enum.
                        let ops = (!ops.is_null())
                            .then(|| std::slice::from_raw_parts(ops.cast::<c_int>(), n).to_vec());
                        TopicAccess::Exists(ops)
                    }
                    Some(RDKafkaErrorCode::UnknownTopicOrPartition) => TopicAccess::Missing,
                    Some(RDKafkaErrorCode::TopicAuthorizationFailed) => TopicAccess::Denied,
                    Some(code) => TopicAccess::Failed(code),
                };
                out.insert(name, access);
            }
            out
        },
    )
}

/// The error the broker answers describing each of `groups` (`None`: described).
pub fn groups<C: ClientContext>(
    client: &Client<C>,
    groups: &[&str],
    timeout: Duration,
) -> Result<BTreeMap<String, Option<RDKafkaErrorCode>>, KafkaError> {
    let (_names, mut ptrs) = c_names(groups);
    let rk = client.native_ptr();
    request(
        client,
        rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        false,
        timeout,
        // SAFETY: the request copies the names; live client, options and queue.
        |options, queue| unsafe {
            rd::rd_kafka_DescribeConsumerGroups(rk, ptrs.as_mut_ptr(), ptrs.len(), options, queue)
        },
        // SAFETY: the event is a live DescribeConsumerGroups result (as above).
        |event| unsafe {
            let mut out = BTreeMap::new();
            let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
            if result.is_null() {
                return out;
            }
            let mut cnt = 0;
            let descs = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut cnt);
            if descs.is_null() {
                return out;
            }
            for &desc in std::slice::from_raw_parts(descs, cnt) {
                let name = text(rd::rd_kafka_ConsumerGroupDescription_group_id(desc));
                out.insert(
                    name,
                    code_of(rd::rd_kafka_ConsumerGroupDescription_error(desc)),
                );
            }
            out
        },
    )
}
