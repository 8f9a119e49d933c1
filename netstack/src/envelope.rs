//! What actors receive: envelopes in mailboxes, and the handle to reply with.
//!
//! A message between actors of one runtime is moved: the envelope holds the
//! sender's value in a `Box<dyn Any>` and the recipient takes it out again, with
//! no serialization and no copy of its contents (design §2.2). A message from
//! another runtime holds its postcard encoding until the recipient opens it as
//! the type it expects.

use blocktree_core::{BtPath, PrincipalId};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::{Any, type_name};
use std::fmt;
use std::sync::Weak;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::addr::{ActorName, Name};
use crate::error::BttpError;
use crate::frame::{self, ErrorCode, RemoteError};
use crate::runtime::Inner;
use crate::wire::Held;

/// A type that can be a message: moved within a runtime, encoded with postcard
/// between runtimes.
pub trait Message: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Message for T {}

/// Who a message came from, as established by the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An actor of this runtime.
    Local,
    /// A client that connected without credentials.
    Anonymous,
    /// A runtime authenticated by its writecap.
    Runtime {
        /// The path its writecap grants.
        path: BtPath,
        /// Its principal.
        principal: PrincipalId,
    },
}

impl Peer {
    /// The runtime path of an authenticated peer.
    pub fn path(&self) -> Option<&BtPath> {
        match self {
            Peer::Runtime { path, .. } => Some(path),
            Peer::Local | Peer::Anonymous => None,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Local => f.write_str("this runtime"),
            Peer::Anonymous => f.write_str("an anonymous client"),
            Peer::Runtime { path, .. } => write!(f, "{path}"),
        }
    }
}

pub(crate) type LocalReply = Result<Box<dyn Any + Send>, RemoteError>;

pub(crate) enum Payload {
    Local(Box<dyn Any + Send>),
    /// The encoded message and its share of the buffer budgets, given back
    /// when the envelope is opened or dropped.
    Remote {
        bytes: Bytes,
        held: Option<Held>,
    },
}

pub(crate) enum ReplyTo {
    Local(oneshot::Sender<LocalReply>),
    Remote {
        stream: quinn::SendStream,
        max_message_size: usize,
    },
}

/// A message delivered to an actor.
pub struct Envelope {
    pub(crate) from: Option<ActorName>,
    pub(crate) peer: Peer,
    pub(crate) to: Name,
    pub(crate) payload: Payload,
    pub(crate) reply: Option<ReplyTo>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("from", &self.from)
            .field("peer", &self.peer)
            .field("to", &self.to)
            .field("call", &self.is_call())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// The sending actor, when an actor sent it; its runtime is the
    /// authenticated peer's path, never what the peer claimed.
    pub fn sender(&self) -> Option<&ActorName> {
        self.from.as_ref()
    }

    /// The runtime (or anonymous client) the message came from.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The name the message was addressed to.
    pub fn to(&self) -> &Name {
        &self.to
    }

    /// True for a call, which wants exactly one reply.
    pub fn is_call(&self) -> bool {
        self.reply.is_some()
    }

    /// Takes the message out as a `T`, with the handle to reply with when it is
    /// a call. A message of another type is an error, and the caller is told.
    pub fn open<T: Message>(self) -> Result<(T, Option<Reply>), BttpError> {
        let Envelope { payload, reply, .. } = self;
        let opened = match payload {
            Payload::Local(value) => {
                value
                    .downcast::<T>()
                    .map(|value| *value)
                    .map_err(|_| BttpError::WrongType {
                        expected: type_name::<T>(),
                    })
            }
            Payload::Remote { bytes, held } => {
                let decoded = postcard::from_bytes::<T>(&bytes);
                drop(held);
                decoded.map_err(|error| BttpError::Decode {
                    expected: type_name::<T>(),
                    reason: error.to_string(),
                })
            }
        };
        match opened {
            Ok(message) => Ok((message, reply.map(Reply))),
            Err(error) => {
                if let Some(reply) = reply {
                    Reply(reply).refuse(RemoteError::new(ErrorCode::Malformed, error.to_string()));
                }
                Err(error)
            }
        }
    }
}

/// The handle a call's recipient answers with. Dropping it unanswered tells the
/// caller there will be no reply.
pub struct Reply(pub(crate) ReplyTo);

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ReplyTo::Local(_) => f.write_str("Reply(local)"),
            ReplyTo::Remote { .. } => f.write_str("Reply(remote)"),
        }
    }
}

impl Reply {
    /// Sends the reply: moved to a local caller, encoded for a remote one.
    pub async fn send<R: Message>(self, value: R) -> Result<(), BttpError> {
        match self.0 {
            ReplyTo::Local(sender) => sender
                .send(Ok(Box::new(value)))
                .map_err(|_| BttpError::CallerGone("the local caller stopped waiting".into())),
            ReplyTo::Remote {
                mut stream,
                max_message_size,
            } => {
                let bytes = match frame::encode_reply(&value, max_message_size) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        let code = match error {
                            frame::FrameError::PayloadTooLarge { .. } => ErrorCode::TooLarge,
                            _ => ErrorCode::Malformed,
                        };
                        let refusal = RemoteError::new(code, format!("the reply: {error}"));
                        write_final(&mut stream, &frame::encode_error(&refusal)).await?;
                        return Err(error.into());
                    }
                };
                write_final(&mut stream, &bytes).await
            }
        }
    }

    /// Answers with a refusal instead of a reply, without waiting for it to be
    /// written.
    pub(crate) fn refuse(self, error: RemoteError) {
        match self.0 {
            ReplyTo::Local(sender) => {
                let _ = sender.send(Err(error));
            }
            ReplyTo::Remote { mut stream, .. } => {
                // Outside a Tokio runtime the stream is just dropped, which
                // finishes it: the caller then learns there is no reply.
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = write_final(&mut stream, &frame::encode_error(&error)).await;
                    });
                }
            }
        }
    }
}

/// Writes the one frame a stream direction carries and finishes it.
pub(crate) async fn write_final(
    stream: &mut quinn::SendStream,
    bytes: &[u8],
) -> Result<(), BttpError> {
    stream
        .write_all(bytes)
        .await
        .map_err(|error| BttpError::CallerGone(error.to_string()))?;
    // Only fails when the stream is already finished or reset, and then the
    // caller has what it will get.
    let _ = stream.finish();
    Ok(())
}

/// Where an actor's messages arrive. Dropping it removes the actor: later
/// messages to its name fail with "no such actor" (or, for a service
/// provider, spawn a new provider).
pub struct Mailbox {
    pub(crate) name: ActorName,
    pub(crate) receiver: mpsc::Receiver<Envelope>,
    pub(crate) runtime: Weak<Inner>,
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mailbox({})", self.name)
    }
}

impl Mailbox {
    /// The actor's name, by which other actors and runtimes address it.
    pub fn name(&self) -> &ActorName {
        &self.name
    }

    /// The actor's id in its runtime.
    pub fn id(&self) -> Uuid {
        self.name.id
    }

    /// The next message; `None` once the runtime is gone.
    pub async fn recv(&mut self) -> Option<Envelope> {
        self.receiver.recv().await
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.upgrade() {
            runtime.forget_actor(self.name.id);
        }
    }
}
