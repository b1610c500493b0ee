//! The one publish path: frame a message once, store it when its stream keeps history, hand it to every
//! reactor.
//!
//! It owns the order of those three steps and the one rule that joins the last two: a stored message is
//! handed to the reactors while history's lock is held, so every mailbox receives stored messages in sequence
//! order whichever thread publishes (the admin thread, the cluster subscriber); the exact switch from replay to
//! live depends on it (see `history`). Both callers come through here: the admin API for local publishes, the
//! cluster bridge for other nodes' publishes and for every cluster-stamped one. It does not decide whether a
//! publish is allowed (draining, overload, the cluster link: `admin`), assign cluster offsets (`cluster`),
//! build encodings (`message`) or pick recipients (the reactors' fanout indexes).
//!
//! A batch publish takes the same path: each item's payload is framed once and every one of its targets gets a
//! [`Message`] sharing those bytes (a message is addressed to one stream, so its envelope and its place in
//! history are per target); the kept ones are stored, and the whole batch goes to each reactor as one command,
//! applied in the body's order.

use crate::dispatch::Reactors;
use crate::history::{Backfill, History};
use crate::message::envelope::Stamp;
use crate::message::{Message, Target};
use crate::proto::frame;
use crate::shared_frame::SharedFrame;
use std::sync::Arc;

/// One message of a batch publish: a payload and every target it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    /// Recipients, in the order given; at least one.
    pub targets: Vec<Target>,
    /// Binary (true) or text frame.
    pub binary: bool,
    /// The payload.
    pub payload: Vec<u8>,
}

/// History and the reactors, as one handle for whoever publishes.
#[derive(Debug, Clone)]
pub struct Publisher {
    history: Arc<History>,
    reactors: Reactors,
}

impl Publisher {
    /// Publishes into this history and to these reactors.
    pub fn new(history: Arc<History>, reactors: Reactors) -> Publisher {
        Publisher { history, reactors }
    }

    /// The node's history (for its reads, deletes, metrics and cluster bookkeeping).
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// The node's reactors (for kicks, presence and overload checks).
    pub fn reactors(&self) -> &Reactors {
        &self.reactors
    }

    /// Publishes a message that has no place in its stream yet: a local publish, or another node's publish of
    /// a stream without shared history. Returns the message as every reactor received it.
    /// `Err` once the node drains: nothing was stored or queued.
    pub fn publish(
        &self,
        target: Target,
        binary: bool,
        payload: &[u8],
    ) -> Result<Arc<Message>, ShuttingDown> {
        let message = Message::new(target, binary, payload);
        let _open = self.reactors.open().ok_or(ShuttingDown)?;
        Ok(self.deliver(message, None))
    }

    /// Publishes a batch: each item framed once, one message per target sharing that frame, in the items'
    /// order and each item's targets' order; messages of streams that keep history are stored. Every reactor
    /// gets the batch as one command. Returns the messages as the reactors received them (with their places in
    /// history, for the answer).
    /// `Err` once the node drains: nothing was stored or queued.
    pub fn publish_batch(
        &self,
        items: Vec<BatchItem>,
    ) -> Result<Arc<[Arc<Message>]>, ShuttingDown> {
        let messages = batch_messages(items);
        let _open = self.reactors.open().ok_or(ShuttingDown)?;
        Ok(self.dispatch_batch(messages))
    }

    fn dispatch_batch(&self, messages: Vec<Message>) -> Arc<[Arc<Message>]> {
        let dispatch = |batch: &Arc<[Arc<Message>]>| self.reactors.publish_batch(batch.clone());
        if messages.iter().any(|m| self.history.keeps(m.target())) {
            return self.history.append_batch(messages, dispatch);
        }
        let batch: Arc<[Arc<Message>]> = messages.into_iter().map(Arc::new).collect();
        dispatch(&batch);
        batch
    }

    /// Publishes a batch from the cluster bus: [`Publisher::publish_batch`], where `stamps` holds one entry per
    /// target of every item, in order: the epoch and offset Redis gave that message in its stream's shared
    /// history and the backfill to store before it (see [`Publisher::publish_stamped`]), or `None` for a
    /// stream the origin keeps no history of. Only the bus reader calls this, in bus order.
    pub fn publish_batch_stamped(
        &self,
        items: Vec<BatchItem>,
        stamps: &[Option<(Stamp<'_>, &[Backfill])>],
    ) -> Arc<[Arc<Message>]> {
        if stamps.iter().all(Option::is_none) {
            return self.dispatch_batch(batch_messages(items));
        }
        let messages = batch_messages(items);
        debug_assert_eq!(messages.len(), stamps.len());
        let dispatch = |batch: &Arc<[Arc<Message>]>| self.reactors.publish_batch(batch.clone());
        let placed = messages.into_iter().zip(stamps.iter().copied());
        self.history.append_batch_stamped(placed, dispatch)
    }

    /// Publishes a message whose epoch and offset the cluster assigned (`stamp`), after storing `backfill`:
    /// earlier messages of its stream and epoch this node never received, for replay only (see
    /// [`History::append_stamped`]). Only the cluster subscriber calls this, in the order Redis assigned the
    /// offsets.
    pub fn publish_stamped(
        &self,
        target: Target,
        binary: bool,
        payload: &[u8],
        stamp: Stamp<'_>,
        backfill: &[Backfill],
    ) -> Arc<Message> {
        self.deliver(
            Message::new(target, binary, payload),
            Some((stamp, backfill)),
        )
    }

    /// Stores the message when its stream keeps history here, and hands it to every reactor.
    fn deliver(&self, message: Message, stamped: Option<(Stamp<'_>, &[Backfill])>) -> Arc<Message> {
        if !self.history.keeps(message.target()) {
            // Not stored, so no reactor expects it in sequence (seq 0). A stamped one comes from a node whose
            // [history] keeps this stream: its envelope carries the cluster's epoch and offset all the same.
            let message = match stamped {
                Some((stamp, _)) => message.stamped(stamp.epoch.into(), stamp.offset, 0),
                None => message,
            };
            let message = Arc::new(message);
            self.reactors.publish(message.clone());
            return message;
        }
        let dispatch = |stored: &Arc<Message>| self.reactors.publish(stored.clone());
        match stamped {
            None => self.history.append(message, dispatch),
            Some((stamp, backfill)) => self
                .history
                .append_stamped(message, stamp, backfill, dispatch),
        }
    }
}

/// A publish refused because the node is draining (`Reactors::shutdown` began): its recipients are closing
/// with 1001, so it is answered 503 instead of accepted and then queued behind their close frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShuttingDown;

/// A batch's messages: each item framed once, one message per target sharing that frame, in the items' order
/// and each item's targets' order.
fn batch_messages(items: Vec<BatchItem>) -> Vec<Message> {
    let count = items.iter().map(|item| item.targets.len()).sum();
    let mut messages = Vec::with_capacity(count);
    for item in items {
        let bare = SharedFrame::new(frame::encode_message(!item.binary, &item.payload));
        messages.extend(
            item.targets
                .into_iter()
                .map(|target| Message::sharing(target, item.binary, bare.clone())),
        );
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{Command, Mailbox};
    use crate::history::store::Limits;
    use crate::history::{Reader, Settings};
    use crate::message::envelope::{self, Position};
    use crate::message::Encoding;
    use crate::proto::frame;
    use mio::{Poll, Token, Waker};

    /// A publisher over `n` real mailboxes (with the polls that keep their wakers valid) and a history that
    /// keeps `user` streams only.
    fn publisher(n: usize) -> (Publisher, Vec<Arc<Mailbox>>, Vec<Poll>) {
        let polls: Vec<Poll> = (0..n).map(|_| Poll::new().unwrap()).collect();
        let mailboxes: Vec<Arc<Mailbox>> = polls
            .iter()
            .map(|p| Mailbox::new(Waker::new(p.registry(), Token(0)).unwrap()))
            .collect();
        let history = History::new(Settings {
            user: true,
            channel: false,
            all: false,
            limits: Limits {
                size: 100_000,
                ttl_ms: 3_600_000,
                max_bytes: 1 << 30,
            },
        });
        let reactors = Reactors::new(
            mailboxes.clone(),
            Arc::new(crate::budget::Budget::new(usize::MAX)),
        );
        (Publisher::new(history, reactors), mailboxes, polls)
    }

    #[test]
    fn a_publish_racing_a_drain_is_queued_ahead_of_the_shutdown_or_refused() {
        // Each round: one thread publishes as fast as it can while another starts the drain. Every publish that
        // was accepted must sit ahead of the shutdown in every mailbox (so it is delivered before the 1001);
        // none may follow it (it would be accepted, then dropped behind the close frames).
        for round in 0..200 {
            let (publisher, mailboxes, _polls) = publisher(2);
            let publisher = Arc::new(publisher);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let racer = {
                let (publisher, stop) = (publisher.clone(), stop.clone());
                std::thread::spawn(move || {
                    // Accepted publishes per user u0, u1, u2 (each goes to its user's home mailbox only).
                    let (mut accepted, mut refused) = ([0usize; 3], 0usize);
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || refused == 0 {
                        let target = Target::User(format!("u{}", n % 3));
                        match publisher.publish(target, false, b"x") {
                            Ok(_) => {
                                accepted[n % 3] += 1;
                                n += 1;
                            }
                            Err(ShuttingDown) => refused += 1,
                        }
                    }
                    accepted
                })
            };
            std::thread::sleep(std::time::Duration::from_micros(50 + round * 3));
            publisher.reactors().shutdown(std::time::Duration::ZERO);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let per_user = racer.join().unwrap();
            for (i, mailbox) in mailboxes.iter().enumerate() {
                let accepted: usize = (0..3)
                    .filter(|u| publisher.reactors().home(&format!("u{u}")) == i)
                    .map(|u| per_user[u])
                    .sum();
                let mut commands = Vec::new();
                mailbox.take_all(&mut commands);
                let shutdown = commands
                    .iter()
                    .position(|c| matches!(c, Command::Shutdown { .. }))
                    .expect("the shutdown is queued");
                assert_eq!(
                    shutdown, accepted,
                    "round {round}: every accepted publish is ahead of it"
                );
                assert_eq!(
                    commands.len(),
                    accepted + 1,
                    "round {round}: nothing follows it"
                );
            }
        }
    }

    /// The messages a mailbox received, in order.
    fn received(mailbox: &Mailbox) -> Vec<Arc<Message>> {
        let mut commands = Vec::new();
        mailbox.take_all(&mut commands);
        mailbox.applied(commands.len());
        commands
            .into_iter()
            .map(|c| match c {
                Command::Publish(m) => m,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn reader(user: &str) -> Reader<'_> {
        Reader {
            user,
            client: None,
            channels: &[],
        }
    }

    #[test]
    fn stored_messages_reach_every_mailbox_once_in_sequence_order_from_two_threads() {
        const EACH: usize = 500;
        let (publisher, mailboxes, _polls) = publisher(2);
        let threads: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|user| {
                let publisher = publisher.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let target = Target::User(user.into());
                        publisher
                            .publish(target, false, i.to_string().as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Each user's messages go to its home reactor only; each mailbox gets them once, in sequence order.
        let mut all: Vec<u64> = Vec::new();
        for mailbox in &mailboxes {
            let seqs: Vec<u64> = received(mailbox).iter().map(|m| m.seq()).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in sequence order");
            all.extend(seqs);
        }
        all.sort();
        let expected: Vec<u64> = (1..=2 * EACH as u64).collect();
        assert_eq!(all, expected, "each stored message once");
    }

    /// The batches a mailbox received, in order.
    fn batches(mailbox: &Mailbox) -> Vec<Arc<[Arc<Message>]>> {
        let mut commands = Vec::new();
        mailbox.take_all(&mut commands);
        mailbox.applied(commands.len());
        commands
            .into_iter()
            .map(|c| match c {
                Command::PublishBatch { messages } => messages,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_batch_frames_each_item_once_for_all_its_targets_and_stores_the_kept_ones() {
        let (publisher, mailboxes, _polls) = publisher(2);
        let items = vec![
            BatchItem {
                targets: vec![
                    Target::User("a".into()),
                    Target::Channel("n".into()),
                    Target::User("b".into()),
                ],
                binary: false,
                payload: b"one".to_vec(),
            },
            BatchItem {
                targets: vec![Target::User("a".into())],
                binary: true,
                payload: vec![2],
            },
        ];
        let sent = publisher.publish_batch(items).unwrap();
        assert_eq!(sent.len(), 4);
        let bare = sent[0].frame(Encoding::Bare);
        for m in &sent[1..3] {
            assert_eq!(
                m.frame(Encoding::Bare).as_ptr(),
                bare.as_ptr(),
                "framed once"
            );
        }
        assert_eq!(sent[3].payload(), [2]);
        // user streams keep history here, channels do not.
        let offsets: Vec<Option<u64>> = sent.iter().map(|m| m.stamp().map(|s| s.offset)).collect();
        assert_eq!(offsets, [Some(1), None, Some(1), Some(2)]);
        let seqs: Vec<u64> = sent.iter().map(|m| m.seq()).collect();
        assert_eq!(seqs, [1, 0, 2, 3]);
        // One command per reactor, holding the messages it has recipients for (a channel's everywhere, a
        // user's at its home), in the batch's order.
        let reactors = publisher.reactors();
        for (i, mailbox) in mailboxes.iter().enumerate() {
            let got = batches(mailbox);
            assert_eq!(got.len(), 1, "one command per reactor");
            let expected: Vec<&Arc<Message>> = sent
                .iter()
                .filter(|m| match m.target() {
                    Target::User(u) => reactors.home(u) == i,
                    _ => true,
                })
                .collect();
            assert_eq!(got[0].len(), expected.len());
            for (g, e) in got[0].iter().zip(expected) {
                assert!(Arc::ptr_eq(g, e));
            }
        }
        let page = publisher.history().read("user:a", 0, 10).unwrap();
        assert_eq!(page.entries.len(), 2);
        assert!(Arc::ptr_eq(&page.entries[0].item, &sent[0]));
    }

    #[test]
    fn a_batch_without_kept_streams_takes_no_place_in_history() {
        let (publisher, mailboxes, _polls) = publisher(1);
        let sent = publisher
            .publish_batch(vec![BatchItem {
                targets: vec![Target::All, Target::Channel("x".into())],
                binary: false,
                payload: b"x".to_vec(),
            }])
            .unwrap();
        assert!(sent.iter().all(|m| m.seq() == 0 && m.stamp().is_none()));
        assert_eq!(publisher.history().last_seq(), 0);
        assert!(Arc::ptr_eq(&batches(&mailboxes[0])[0], &sent));
    }

    #[test]
    fn every_reactor_and_history_share_one_message() {
        let (publisher, mailboxes, _polls) = publisher(2);
        let sent = publisher
            .publish(Target::User("u".into()), false, b"hi")
            .unwrap();
        let home = publisher.reactors().home("u");
        assert!(Arc::ptr_eq(&received(&mailboxes[home])[0], &sent));
        assert!(
            received(&mailboxes[1 - home]).is_empty(),
            "only the user's home"
        );
        let page = publisher.history().read("user:u", 0, 10).unwrap();
        assert!(Arc::ptr_eq(&page.entries[0].item, &sent));
        assert_eq!(page.entries[0].item.payload(), b"hi");
    }

    #[test]
    fn an_unstored_message_is_not_enveloped_until_a_recipient_asks() {
        let (publisher, mailboxes, _polls) = publisher(1);
        let sent = publisher
            .publish(Target::Channel("news".into()), false, b"x")
            .unwrap();
        assert_eq!((sent.seq(), sent.stamp()), (0, None));
        assert!(publisher.history().read("channel:news", 0, 10).is_none());
        let bare_only = Message::new(Target::Channel("news".into()), false, b"x").footprint();
        assert_eq!(sent.footprint(), bare_only, "no envelope built yet");
        let got = received(&mailboxes[0]).remove(0);
        let expected =
            frame::encode_message(true, &envelope::encode("channel:news", None, true, b"x"));
        assert_eq!(got.frame(Encoding::Envelope), &expected);
        assert!(
            sent.footprint() > bare_only,
            "built once asked, for everyone"
        );
    }

    #[test]
    fn stamped_messages_store_backfill_first_and_dispatch_only_the_live_one() {
        let (publisher, mailboxes, _polls) = publisher(2);
        let backfill: Vec<Backfill> = (5..7)
            .map(|offset| Backfill {
                offset,
                client: (offset == 6).then(|| "tab".to_string()),
                binary: false,
                payload: offset.to_string().into_bytes(),
            })
            .collect();
        let stamp = Stamp {
            epoch: "REDIS1",
            offset: 7,
        };
        let live =
            publisher.publish_stamped(Target::User("u".into()), false, b"7", stamp, &backfill);
        assert_eq!(live.stamp(), Some(stamp));
        let got: Vec<Arc<Message>> = mailboxes.iter().flat_map(|m| received(m)).collect();
        assert_eq!(got.len(), 1, "backfill is for replay only");
        assert!(Arc::ptr_eq(&got[0], &live));
        let page = publisher.history().read("user:u", 0, 10).unwrap();
        let stored: Vec<(u64, Option<&str>, &[u8])> = page
            .entries
            .iter()
            .map(|e| (e.offset, e.client.as_deref(), e.item.payload()))
            .collect();
        assert_eq!(
            stored,
            [
                (5, None, &b"5"[..]),
                (6, Some("tab"), b"6"),
                (7, None, b"7")
            ]
        );
        assert_eq!(
            page.entries[1].item.target(),
            &Target::UserClient("u".into(), "tab".into())
        );
        // A reactor that has not applied the live message yet replays the backfill only; the live one comes
        // through its mailbox.
        let since = [Position {
            stream: "user:u".into(),
            epoch: "REDIS1".into(),
            offset: 4,
        }];
        let mut out = Vec::new();
        publisher.history().recover(
            &since,
            reader("u"),
            0,
            Encoding::Envelope,
            &Default::default(),
            &mut out,
        );
        let offsets: Vec<u64> = out
            .iter()
            .map(|f| {
                let json: serde_json::Value =
                    serde_json::from_slice(envelope::frame_payload(f.bytes())).unwrap();
                json["o"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(offsets, [5], "offset 6 was for another client token");
        out.clear();
        publisher.history().recover(
            &since,
            reader("u"),
            live.seq(),
            Encoding::Envelope,
            &Default::default(),
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert!(out[1].ptr_eq(live.shared(Encoding::Envelope)));
    }

    #[test]
    fn a_stamped_message_of_a_stream_not_kept_here_is_delivered_with_the_cluster_stamp() {
        let (publisher, mailboxes, _polls) = publisher(1);
        let stamp = Stamp {
            epoch: "E",
            offset: 3,
        };
        let sent = publisher.publish_stamped(Target::All, false, b"x", stamp, &[]);
        assert_eq!((sent.seq(), sent.stamp()), (0, Some(stamp)));
        assert!(publisher.history().read("all", 0, 10).is_none());
        assert!(Arc::ptr_eq(&received(&mailboxes[0])[0], &sent));
    }
}
