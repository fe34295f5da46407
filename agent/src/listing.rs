//! ListInstances answered from each instance's encoded entry, kept for as
//! long as the instance shows what it showed when the entry was made.
//!
//! A cluster master polls the list far more often than instances change,
//! and converting and encoding every entry anew made a list's cost grow
//! with the instance count; a kept entry costs a comparison and a copy. Only the uptime changes on its own, so
//! it is left out of the kept entry and added to it at each call (a
//! protobuf message's fields may come in any order).
//!
//! The generated service returns a `ListInstancesResponse` that tonic
//! encodes, so [`NodeAgentApi`] answers this one method itself, with a
//! codec that sends bytes already encoded, and passes every other call to
//! the generated service.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::BufMut;
use kvm_agent_proto::v1 as pb;
use prost::Message;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService};
use tonic_prost::ProstDecoder;

use crate::convert::{uptime_seconds, view_to_proto};
use crate::instances::Agent;
use crate::model::InstanceView;

/// The method [`NodeAgentApi`] answers itself.
const LIST_INSTANCES: &str = "/kvmagent.v1.NodeAgent/ListInstances";

/// The key of `ListInstancesResponse.instances`: field 1, length-delimited.
const INSTANCES_KEY: u8 = (1 << 3) | 2;

/// Each listed instance's `InstanceInfo`, encoded without its uptime, and
/// the view it was made from.
#[derive(Debug, Default)]
pub struct ListedEntries {
    kept: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    view: InstanceView,
    encoded: Vec<u8>,
}

impl Entry {
    fn new(view: &InstanceView) -> Entry {
        let info = pb::InstanceInfo {
            uptime_seconds: 0,
            ..view_to_proto(view.clone())
        };
        Entry {
            view: view.clone(),
            encoded: info.encode_to_vec(),
        }
    }
}

impl ListedEntries {
    /// The encoded `ListInstancesResponse` of `views`, in their order,
    /// reusing each entry whose view hasn't changed.
    pub fn encode(&self, views: &[InstanceView]) -> Vec<u8> {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let mut body = Vec::with_capacity(views.len() * 160);
        for view in views {
            if !kept.get(&view.name).is_some_and(|e| e.view == *view) {
                kept.insert(view.name.clone(), Entry::new(view));
            }
            let entry = &kept[&view.name];
            let uptime = pb::InstanceInfo {
                uptime_seconds: uptime_seconds(view.started_at),
                ..Default::default()
            };
            body.push(INSTANCES_KEY);
            prost::encode_length_delimiter(entry.encoded.len() + uptime.encoded_len(), &mut body)
                .expect("a Vec grows as needed");
            body.extend_from_slice(&entry.encoded);
            uptime.encode(&mut body).expect("a Vec grows as needed");
        }
        // Every view has its entry now; any other is of an instance deleted
        // or renamed since (rare, so a linear look-up will do).
        if kept.len() > views.len() {
            kept.retain(|name, _| views.iter().any(|v| v.name == *name));
        }
        body
    }
}

/// The generated NodeAgent service, with ListInstances answered from
/// [`ListedEntries`].
#[derive(Debug, Clone)]
pub struct NodeAgentApi<S> {
    generated: S,
    agent: Arc<Agent>,
    entries: Arc<ListedEntries>,
    max_request_bytes: usize,
}

impl<S> NodeAgentApi<S> {
    /// Wraps `generated`, the NodeAgent server made from the same agent.
    pub fn new(generated: S, agent: Arc<Agent>, max_request_bytes: usize) -> Self {
        NodeAgentApi {
            generated,
            agent,
            entries: Arc::default(),
            max_request_bytes,
        }
    }
}

impl<S: NamedService> NamedService for NodeAgentApi<S> {
    const NAME: &'static str = S::NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for NodeAgentApi<S>
where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future = Answer,
        >,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Answer {
        if req.uri().path() != LIST_INSTANCES {
            return self.generated.call(req);
        }
        let (agent, entries) = (self.agent.clone(), self.entries.clone());
        let list = tower::service_fn(move |_: tonic::Request<pb::ListInstancesRequest>| {
            let body = entries.encode(&agent.list());
            std::future::ready(Ok::<_, tonic::Status>(tonic::Response::new(body)))
        });
        let mut grpc = Grpc::new(EncodedCodec)
            .apply_max_message_size_config(Some(self.max_request_bytes), None);
        Box::pin(async move { Ok(grpc.unary(list, req).await) })
    }
}

/// Decodes a `ListInstancesRequest`; sends a response already encoded.
#[derive(Debug, Clone, Copy)]
struct EncodedCodec;

impl Codec for EncodedCodec {
    type Encode = Vec<u8>;
    type Decode = pb::ListInstancesRequest;
    type Encoder = EncodedCodec;
    type Decoder = ProstDecoder<pb::ListInstancesRequest>;

    fn encoder(&mut self) -> EncodedCodec {
        EncodedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

impl Encoder for EncodedCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use hypervisor::Runtime;

    use super::*;
    use crate::ganeti::command_line::tests::{ganeti, ganeti_cmdline, live};
    use crate::model::State;

    fn view(name: &str, state: State) -> InstanceView {
        InstanceView {
            name: name.to_owned(),
            state,
            detail: String::new(),
            pid: None,
            started_at: None,
            runtime: None,
            taps: Vec::new(),
            reconciling: false,
            balloon_mib: None,
            unconfined: None,
            stopped_by_guest: false,
        }
    }

    fn decoded(body: &[u8]) -> Vec<pb::InstanceInfo> {
        pb::ListInstancesResponse::decode(body)
            .expect("a valid ListInstancesResponse")
            .instances
    }

    fn running(name: &str, pid: u32, up: Duration) -> InstanceView {
        InstanceView {
            pid: Some(pid),
            started_at: Some(SystemTime::now() - up),
            runtime: Some(Arc::new(sample_runtime())),
            taps: vec![format!("tap-{name}")],
            balloon_mib: Some(100),
            ..view(name, State::Running)
        }
    }

    /// A runtime with disks and NICs: one taken over from Ganeti's driver.
    fn sample_runtime() -> Runtime {
        crate::ganeti::translate("web1", &ganeti(), &ganeti_cmdline(), &live()).unwrap()
    }

    #[test]
    fn the_list_decodes_to_what_each_view_converts_to() {
        let views = vec![
            running("a", 10, Duration::from_secs(90)),
            view("b", State::Stopped),
            running("c", 12, Duration::ZERO),
        ];
        let entries = ListedEntries::default();
        let expected: Vec<pb::InstanceInfo> = views.iter().cloned().map(view_to_proto).collect();
        // The first list encodes; the second reuses every kept entry.
        assert_eq!(decoded(&entries.encode(&views)), expected);
        assert_eq!(decoded(&entries.encode(&views)), expected);
        assert_eq!(expected[0].uptime_seconds, 90);
        assert!(!expected[0].devices.is_empty());
    }

    #[test]
    fn a_changed_instance_is_encoded_again_and_a_gone_one_forgotten() {
        let entries = ListedEntries::default();
        let mut views = vec![running("a", 10, Duration::ZERO), view("b", State::Stopped)];
        entries.encode(&views);

        views[0].state = State::Paused;
        views[1].detail = "stopped by SIGKILL".to_owned();
        let listed = decoded(&entries.encode(&views));
        assert_eq!(listed[0].state, pb::InstanceState::Paused as i32);
        assert_eq!(listed[1].state_detail, "stopped by SIGKILL");

        views.remove(0);
        let listed = decoded(&entries.encode(&views));
        assert_eq!(listed.len(), 1);
        assert_eq!(entries.kept.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_uptime_is_added_to_the_kept_entry_at_each_list() {
        let entries = ListedEntries::default();
        let views = vec![running("a", 10, Duration::from_secs(5))];
        assert_eq!(decoded(&entries.encode(&views))[0].uptime_seconds, 5);
        let kept = &entries.kept.lock().unwrap()["a"].encoded;
        assert_eq!(
            pb::InstanceInfo::decode(&kept[..]).unwrap().uptime_seconds,
            0
        );
    }

    #[test]
    fn an_empty_list_is_an_empty_message() {
        assert!(ListedEntries::default().encode(&[]).is_empty());
    }
}
