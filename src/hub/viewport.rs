//! One viewport: a client socket that receives every frame of its hub from
//! its own cursor and, while it owns the session, writes to the runtime.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::interrupts::Interrupts;
use super::ring::{Next, Start, ViewportHandle};
use super::{Hub, HubClose};
use crate::shutdown::Shutdown;
use crate::sockets::CloseRx;
use crate::sockets::close::{self, Close};
use crate::sockets::contract;

/// Frames taken from the ring per lock.
const BATCH: usize = 64;
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A lagging viewport's close frame waits this long behind what its client
/// has not read yet, so a reader that resumes still learns why.
const LAG_CLOSE_WAIT: Duration = Duration::from_secs(5);
const NOT_OWNED: &str =
    r#"{"type":"error","code":"session_not_owned","message":"Session is owned by another client"}"#;

pub type ClientWs = WebSocketStream<TokioIo<Upgraded>>;

/// A viewport attached to its hub. Detaches when dropped, so a client that
/// never completes its upgrade still frees its place (and ownership).
pub struct Viewport {
    hub: Arc<Hub>,
    id: u64,
    start: Start,
    handle: ViewportHandle,
    /// Known to own the session (ownership is only ever given up by its
    /// holder, so once true it stays true until this viewport leaves).
    owns: bool,
    /// Already counted out of its hub (and the store).
    released: bool,
    /// The hub's owner, for `portcullis.role` frames (SPEC §9); read only
    /// when the client asked for the browser contract.
    owner_rx: watch::Receiver<Option<String>>,
}

/// How a viewport's loop ended.
#[derive(Debug)]
enum Exit {
    /// Tell the client this, waiting at most so long for its reply.
    Close(HubClose, Duration),
    /// The client left or its socket failed: nothing to say to it.
    Gone,
}

fn close(c: Close) -> Exit {
    Exit::Close(c.into(), CLOSE_WAIT)
}

fn lagged() -> Exit {
    Exit::Close(close::TRY_AGAIN_LATER.into(), LAG_CLOSE_WAIT)
}

impl Viewport {
    pub(super) fn new(
        hub: Arc<Hub>,
        id: u64,
        start: Start,
        handle: ViewportHandle,
        owner_rx: watch::Receiver<Option<String>>,
    ) -> Self {
        Viewport {
            owns: start.owner,
            released: false,
            hub,
            id,
            start,
            handle,
            owner_rx,
        }
    }

    /// SPEC §9: the first frame of a browser-contract viewport.
    fn hello(&self) -> String {
        let s = self.start;
        let start = contract::SharedStart {
            role: if s.owner { "owner" } else { "reader" },
            seq: s.seq,
            resume: s.resume_ok.map(|ok| if ok { "ok" } else { "gap" }),
        };
        contract::hello(&self.hub.session_id, Some(start))
    }

    /// SPEC §9: what this viewport is told when the owner changed, as
    /// (owner, owner_present).
    fn role_now(&mut self) -> (bool, bool) {
        let me = self.hub.viewport_name(self.id);
        let owner = self.owner_rx.borrow_and_update();
        (owner.as_deref() == Some(me.as_str()), owner.is_some())
    }

    /// Where this viewport starts and whether it owns the session: what its
    /// `101` says.
    pub fn start(&self) -> Start {
        self.start
    }

    /// The subprotocol the runtime chose when the hub dialled it.
    pub fn protocol(&self) -> Option<HeaderValue> {
        self.hub.protocol()
    }

    /// Serves the viewport until it or its hub ends. Returns the close code
    /// sent to the client, if any.
    /// `browser`: the client asked for the browser contract (SPEC §9), so
    /// it is sent the hello first and role frames when the owner changes.
    pub async fn serve(
        mut self,
        mut ws: ClientWs,
        close_rx: CloseRx,
        shutdown: Shutdown,
        browser: bool,
    ) -> Option<u16> {
        let mut interrupts = Interrupts::new(close_rx, shutdown);
        // What the client was told of the owner: the hello's role and, for
        // a reader (whose hello cannot say whether anyone writes), a role
        // frame right behind it, so a page can explain why it cannot type.
        let exit = if browser {
            let (_, present) = self.role_now();
            let told = (self.start.owner, self.start.owner || present);
            let greeted = async {
                ws.feed(Message::text(self.hello())).await?;
                if !self.start.owner {
                    ws.feed(role_frame(told)).await?;
                }
                ws.flush().await
            };
            match greeted.await {
                Ok(()) => self.pump(&mut ws, &mut interrupts, Some(told)).await,
                Err(_) => Exit::Gone,
            }
        } else {
            self.pump(&mut ws, &mut interrupts, None).await
        };
        tracing::debug!(session = %self.hub.session_id, viewport = self.id, ?exit, "viewport ending");
        // Detach first: the hub's grace clock starts now, not after the
        // client has answered our close, and by the time the client sees
        // the close its ownership is free on every instance.
        self.released = true;
        self.hub.leave(self.id, self.owns).await;
        drop(self);
        match exit {
            Exit::Gone => {
                // `SinkExt::close` flushes the close reply tungstenite queued
                // when the client's close arrived; the inherent `close` would
                // try to send a new close frame and fail.
                let _ = tokio::time::timeout(CLOSE_WAIT, SinkExt::close(&mut ws)).await;
                None
            }
            Exit::Close(c, wait) => {
                let frame = CloseFrame {
                    code: CloseCode::from(c.code),
                    reason: Cow::into_owned(c.reason).into(),
                };
                let _ = tokio::time::timeout(wait, async {
                    ws.close(Some(frame)).await?;
                    // Wait for the client's close reply (or its hang-up).
                    while let Some(Ok(_)) = ws.next().await {}
                    Ok::<_, WsError>(())
                })
                .await;
                Some(c.code)
            }
        }
    }

    /// The viewport's loop: deliver the ring from the cursor, forward the
    /// owner's frames, until something ends it. Every wait on a peer (a slow
    /// client, a slow runtime) is interruptible by revocation and shutdown.
    /// `told`: with the browser contract, what the client last heard of
    /// the owner; role frames follow its changes.
    async fn pump(
        &mut self,
        ws: &mut ClientWs,
        interrupts: &mut Interrupts,
        told: Option<(bool, bool)>,
    ) -> Exit {
        let hub = self.hub.clone();
        let mut wake = hub.wake.subscribe();
        let mut cursor = self.handle.cursor.load(Ordering::Acquire);
        let browser = told.is_some();
        let mut told = told.unwrap_or_default();
        loop {
            let next = hub.ring().next_for(cursor, BATCH);
            match next {
                Next::Lagged => return lagged(),
                Next::Closed(c) => return Exit::Close(c, CLOSE_WAIT),
                Next::Send(batch) => {
                    let n = batch.len() as u64;
                    if let Some(exit) = self.deliver(ws, batch, cursor, interrupts).await {
                        return exit;
                    }
                    cursor += n;
                    self.handle.cursor.store(cursor, Ordering::Release);
                    continue;
                }
                Next::Wait => {}
            }
            tokio::select! {
                _ = wake.changed() => {}
                r = self.owner_rx.changed(), if browser => {
                    // The hub holds the sender and this viewport the hub:
                    // an error cannot happen while it runs.
                    if r.is_err() {
                        continue;
                    }
                    let now = self.role_now();
                    if now != told {
                        told = now;
                        let frame = role_frame(now);
                        tokio::select! {
                            r = ws.send(frame) => if r.is_err() { return Exit::Gone },
                            c = interrupts.next() => return close(c),
                        }
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        let sent = tokio::select! {
                            r = self.forward(ws, m) => r,
                            c = interrupts.next() => Err(close(c)),
                        };
                        if let Err(exit) = sent {
                            return exit;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return Exit::Gone,
                    Some(Ok(_)) => {}
                    Some(Err(WsError::Capacity(_))) => return close(close::TOO_BIG),
                    Some(Err(_)) => return Exit::Gone,
                },
                c = interrupts.next() => return close(c),
            }
        }
    }

    /// Sends a batch from the ring; `Some` when the viewport must end
    /// instead (its client failed, it lagged out of the ring, or it was
    /// interrupted).
    async fn deliver(
        &self,
        ws: &mut ClientWs,
        batch: Vec<Message>,
        cursor: u64,
        interrupts: &mut Interrupts,
    ) -> Option<Exit> {
        let send = async {
            for m in batch {
                ws.feed(m).await?;
            }
            ws.flush().await
        };
        tokio::pin!(send);
        loop {
            tokio::select! {
                r = &mut send => return r.err().map(|_| Exit::Gone),
                _ = self.handle.lagged.notified() => {
                    // A stale wake-up is possible; only a real gap counts.
                    if matches!(self.hub.ring().next_for(cursor, 0), Next::Lagged) {
                        return Some(lagged());
                    }
                }
                c = interrupts.next() => return Some(close(c)),
            }
        }
    }

    /// A data frame from the client: upstream if this viewport owns the
    /// session (claiming free ownership), else the `session_not_owned`
    /// notice. Waits on a slow runtime or a client that does not read.
    async fn forward(&mut self, ws: &mut ClientWs, m: Message) -> Result<(), Exit> {
        let owns = self
            .hub
            .may_write(self.id, self.owns)
            .await
            .map_err(|_| close(close::TRY_AGAIN_LATER))?;
        self.owns = owns;
        if owns {
            self.hub
                .send_upstream(m)
                .await
                .map_err(|()| close(close::UPSTREAM_GONE))
        } else {
            ws.send(Message::text(NOT_OWNED))
                .await
                .map_err(|_| Exit::Gone)
        }
    }
}

/// SPEC §9: `{"type":"portcullis.role","role":…,"owner_present":…}`.
fn role_frame((owner, present): (bool, bool)) -> Message {
    Message::text(contract::role(owner, present))
}

impl Drop for Viewport {
    fn drop(&mut self) {
        if !self.released {
            self.hub.detach(self.id, self.owns);
        }
    }
}
