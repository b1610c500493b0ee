//! The cluster bus as a numbered sequence, sans-IO: where this node is in it, what to do with each entry read
//! from Redis, when it lost entries it can never get back, and how much it may read at once.
//!
//! The bus is one Redis stream (`{prefix}:bus`). Every entry's id is `{epoch}-{seq}`: the **epoch** is the time
//! in milliseconds (Redis's clock) at which the stream started, the same for all its entries, and `seq` is
//! assigned by Redis itself (`XADD {epoch}-*`, Redis 7), one more than the last entry's, from 0. Entry number
//! `n` is `seq + 1`. So numbers have no holes within an epoch, a stream that is lost and started again gets
//! another epoch, and a node that remembers `(epoch, n)` of the last entry it applied ([`BusPosition`]) can
//! tell for certain, from what Redis holds, whether it can continue without a loss:
//!
//! - the next entry is `n + 1` in the same epoch: nothing was lost (a reconnection, however long, that stayed
//!   within the retained window, `cluster.bus_max_len`);
//! - the first entry Redis still holds is past `n + 1`: entries were trimmed before this node read them
//!   ([`Gap::Trimmed`]);
//! - the epoch changed or the stream is gone: whatever followed `n` is unknowable ([`Gap::NewEpoch`]);
//! - the last entry is before `n` in the same epoch: Redis lost entries this node had applied (a failover with
//!   asynchronous replication). Nothing is missing *here*; the node reads on from Redis's last entry, whose
//!   successors are new messages.
//!
//! It owns those rules ([`Cursor`]), the id layout ([`parse_id`], [`read_after`]) and the read size ([`room`],
//! [`BatchSize`]); it does no I/O and holds no connection. The reader thread (`reader`) feeds it what Redis
//! answers and carries out its verdicts; the appends are `scripts` and `Cluster::append`.

use std::fmt;
use std::str::FromStr;

/// Where a node is in the bus: the bus epoch and the number of the last entry it applied. A successor process
/// (live upgrade) that starts from its predecessor's position continues exactly where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusPosition {
    /// The bus epoch; 0 when the bus did not exist when the node last looked (then any epoch starting at
    /// entry 1 is the one it follows).
    pub epoch: u64,
    /// The number of the last entry applied (0: none yet in this epoch).
    pub applied: u64,
}

impl fmt::Display for BusPosition {
    /// `EPOCH:N`, the form a handoff carries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.applied)
    }
}

/// Why a [`BusPosition`] did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a bus position is EPOCH:NUMBER, e.g. 1767225600000:1042")]
pub struct PositionError;

impl FromStr for BusPosition {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<BusPosition, PositionError> {
        let (epoch, applied) = s.split_once(':').ok_or(PositionError)?;
        let epoch: u64 = epoch.parse().map_err(|_| PositionError)?;
        let applied: u64 = applied.parse().map_err(|_| PositionError)?;
        if epoch == 0 && applied != 0 {
            return Err(PositionError);
        }
        Ok(BusPosition { epoch, applied })
    }
}

/// The epoch and number of an entry, from its stream id `{epoch}-{seq}`; `None` for an id no stream has.
pub fn parse_id(id: &str) -> Option<Edge> {
    let (epoch, seq) = id.split_once('-')?;
    let (epoch, seq): (u64, u64) = (epoch.parse().ok()?, seq.parse().ok()?);
    Some(Edge {
        epoch,
        number: seq.checked_add(1)?,
    })
}

/// The stream id to give `XREAD` to read the entries after `position`: all of the stream when nothing of its
/// epoch was applied yet.
pub fn read_after(position: Option<&BusPosition>) -> String {
    match position {
        Some(p) if p.epoch != 0 && p.applied > 0 => format!("{}-{}", p.epoch, p.applied - 1),
        _ => "0-0".to_owned(),
    }
}

/// An entry's place: its epoch and number (the first or last entry Redis holds, or one just read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// The bus epoch.
    pub epoch: u64,
    /// The entry's number in its epoch, from 1.
    pub number: u64,
}

/// Why this node may have missed bus entries it can never read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// The node's first link: connections that opened before it may have missed what other nodes published
    /// while this one was not reading (it started while Redis was unreachable).
    Start,
    /// Entries after the node's position were trimmed (`cluster.bus_max_len`) before it read them: it was
    /// disconnected or too slow for longer than the retained window.
    Trimmed {
        /// How many entries are gone.
        lost: u64,
    },
    /// The bus epoch changed or the stream is gone: Redis restarted without persistence, failed over to a
    /// replica without it, or the key was deleted. What followed the position is unknowable.
    NewEpoch,
}

/// Where to read from after (re)connecting, and whether entries were lost on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Read the entries after this number.
    pub after: u64,
    /// Entries this node will never read, if any: its connections must be told.
    pub gap: Option<Gap>,
    /// Redis holds fewer entries of this epoch than the node applied (a failover lost some): the node reads
    /// on from Redis's last one. Nothing is missing here; counted and logged.
    pub rewound: bool,
}

/// What to do with one entry read from the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it; when `gap` is set, entries before it were lost and the connections must be told first.
    Apply {
        /// Entries lost just before this one.
        gap: Option<Gap>,
    },
    /// Already applied (a number at or before the position): skip it.
    Skip,
    /// It belongs to another epoch: the stream was replaced while this node was reading. Stop reading this
    /// batch and resume (which reports the gap and reads the new epoch from its start).
    Resume,
}

/// This node's place in the bus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// `None` until the first link: the node has never looked at the bus.
    position: Option<BusPosition>,
}

impl Cursor {
    /// A cursor that starts where a predecessor stopped, or (`None`) at the bus's end on the first link.
    pub fn new(from: Option<BusPosition>) -> Cursor {
        Cursor { position: from }
    }

    /// The position: the last entry applied; `None` before the first link.
    pub fn position(&self) -> Option<&BusPosition> {
        self.position.as_ref()
    }

    /// Decides where to read after a (re)connection, or a periodic check, from the first (`head`) and last
    /// (`tail`) entries Redis holds (`None` when the stream does not exist). The position is then the place to
    /// read after ([`read_after`]).
    pub fn resume(&mut self, head: Option<Edge>, tail: Option<Edge>) -> Resume {
        let plain = |after| Resume {
            after,
            gap: None,
            rewound: false,
        };
        let gap = |after, gap| Resume {
            after,
            gap: Some(gap),
            rewound: false,
        };
        let Some(position) = self.position else {
            // First link: start at the end. Earlier entries were for connections this node did not have, except
            // those that opened before the link came up (Gap::Start tells them).
            let (epoch, applied) = tail.map_or((0, 0), |t| (t.epoch, t.number));
            self.position = Some(BusPosition { epoch, applied });
            return gap(applied, Gap::Start);
        };
        let Some(tail) = tail else {
            // No stream: nothing to read yet. Lost only if this node had followed an epoch that is now gone.
            self.position = Some(BusPosition {
                epoch: 0,
                applied: 0,
            });
            return if position.epoch != 0 {
                gap(0, Gap::NewEpoch)
            } else {
                plain(0)
            };
        };
        let head = head.filter(|h| h.epoch == tail.epoch).unwrap_or(Edge {
            epoch: tail.epoch,
            number: 1,
        });
        // From the oldest entry held: what was trimmed of the epoch is part of the same gap.
        let from_head = BusPosition {
            epoch: tail.epoch,
            applied: head.number - 1,
        };
        if position.epoch == 0 {
            // The stream did not exist when this node last looked: every entry of its epoch is new to it.
            self.position = Some(from_head);
            return match from_head.applied {
                0 => plain(0),
                lost => gap(lost, Gap::Trimmed { lost }),
            };
        }
        if position.epoch != tail.epoch {
            self.position = Some(from_head);
            return gap(from_head.applied, Gap::NewEpoch);
        }
        if tail.number < position.applied {
            self.position = Some(BusPosition {
                epoch: tail.epoch,
                applied: tail.number,
            });
            return Resume {
                after: tail.number,
                gap: None,
                rewound: true,
            };
        }
        if head.number > position.applied + 1 {
            self.position = Some(from_head);
            let lost = from_head.applied - position.applied;
            return gap(from_head.applied, Gap::Trimmed { lost });
        }
        plain(position.applied)
    }

    /// Judges an entry just read after the position; on [`Verdict::Apply`] the position moves to it.
    pub fn accept(&mut self, entry: Edge) -> Verdict {
        let Some(position) = &mut self.position else {
            debug_assert!(false, "entries are read only after a resume");
            return Verdict::Resume;
        };
        if position.epoch != 0 && position.epoch != entry.epoch {
            return Verdict::Resume;
        }
        if entry.number <= position.applied {
            return Verdict::Skip;
        }
        let lost = entry.number - position.applied - 1;
        *position = BusPosition {
            epoch: entry.epoch,
            applied: entry.number,
        };
        Verdict::Apply {
            gap: (lost > 0).then_some(Gap::Trimmed { lost }),
        }
    }
}

/// Entries the reader may take now without any reactor's mailbox passing `bound` commands: each entry queues at
/// least one command per mailbox, and one more is kept for a gap notice. `fullest` is the most commands pending
/// in any mailbox. 0 means wait: the reactors are behind, and the bus keeps what is not read yet. An entry that
/// weighs more (a batch) is checked again on its own before it is applied ([`fits`]).
pub fn room(fullest: usize, bound: usize, batch: usize) -> usize {
    bound.saturating_sub(fullest + 1).min(batch)
}

/// Whether an entry that weighs `weight` commands per mailbox (a batch weighs one per message, as `dispatch`
/// counts it) may be applied now: it fits under `bound` with one to spare for a gap notice, or every mailbox is
/// empty. The second case lets a batch heavier than the bound itself through alone, as the admin API lets one
/// batch past the bound of a node whose reactors are not behind; a mailbox never holds more than one such batch.
pub fn fits(fullest: usize, bound: usize, weight: usize) -> bool {
    fullest == 0 || fullest + weight < bound
}

/// Bytes one read should bring at most, roughly: a reply is held whole in memory before it is applied.
pub const READ_BYTES_TARGET: usize = 4 << 20;

/// How many entries to ask for per read: up to a maximum, fewer after a read of large entries, so one reply
/// holds about [`READ_BYTES_TARGET`] bytes rather than `max` times the largest message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize {
    count: usize,
    max: usize,
}

impl BatchSize {
    /// Starts at `max` entries per read (at least 1).
    pub fn new(max: usize) -> BatchSize {
        let max = max.max(1);
        BatchSize { count: max, max }
    }

    /// Entries to ask for in the next read.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adjusts after a read that brought `entries` entries of `bytes` bytes in all.
    pub fn after_read(&mut self, entries: usize, bytes: usize) {
        if entries == 0 {
            return;
        }
        if bytes > READ_BYTES_TARGET {
            let fitting = (entries as u128 * READ_BYTES_TARGET as u128 / bytes as u128) as usize;
            self.count = fitting.clamp(1, self.max);
        } else if entries >= self.count {
            // Small entries again: grow back, doubling, so one large message does not slow reads for long.
            self.count = (self.count * 2).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = 1_767_225_600_000;
    const F: u64 = E + 5_000;

    fn edge(epoch: u64, number: u64) -> Option<Edge> {
        Some(Edge { epoch, number })
    }

    fn entry(epoch: u64, number: u64) -> Edge {
        Edge { epoch, number }
    }

    fn at(epoch: u64, applied: u64) -> Cursor {
        Cursor::new(Some(BusPosition { epoch, applied }))
    }

    fn resumed(after: u64, gap: Option<Gap>) -> Resume {
        Resume {
            after,
            gap,
            rewound: false,
        }
    }

    #[test]
    fn positions_round_trip_as_text() {
        let p = BusPosition {
            epoch: E,
            applied: 1042,
        };
        assert_eq!(p.to_string(), "1767225600000:1042");
        assert_eq!("1767225600000:1042".parse::<BusPosition>(), Ok(p));
        assert_eq!(
            "0:0".parse::<BusPosition>().map(|p| p.applied),
            Ok(0),
            "no epoch seen yet"
        );
        for bad in ["", "E", "1:x", "0:5", "a:1", "1:-1", "1:2:3"] {
            assert_eq!(bad.parse::<BusPosition>(), Err(PositionError), "{bad}");
        }
    }

    #[test]
    fn ids_carry_the_epoch_and_the_number_less_one() {
        assert_eq!(parse_id("1767225600000-0"), Some(entry(E, 1)));
        assert_eq!(parse_id("1767225600000-16"), Some(entry(E, 17)));
        for foreign in ["17", "x-0", "1-y", "", "-1"] {
            assert_eq!(parse_id(foreign), None, "{foreign}");
        }
        let p = BusPosition {
            epoch: E,
            applied: 17,
        };
        assert_eq!(read_after(Some(&p)), "1767225600000-16");
        assert_eq!(
            parse_id(&read_after(Some(&p))).unwrap().number,
            17,
            "XREAD returns the entries after the last applied"
        );
        let none_yet = BusPosition {
            epoch: E,
            applied: 0,
        };
        assert_eq!(read_after(Some(&none_yet)), "0-0");
        assert_eq!(read_after(None), "0-0");
    }

    #[test]
    fn the_first_link_starts_at_the_end_and_tells_early_connections() {
        let mut c = Cursor::new(None);
        assert_eq!(
            c.resume(edge(E, 3), edge(E, 90)),
            resumed(90, Some(Gap::Start))
        );
        assert_eq!(c.accept(entry(E, 91)), Verdict::Apply { gap: None });
        assert_eq!(c.position().unwrap().applied, 91);

        let mut empty = Cursor::new(None);
        assert_eq!(empty.resume(None, None), resumed(0, Some(Gap::Start)));
        assert_eq!(
            empty.accept(entry(F, 1)),
            Verdict::Apply { gap: None },
            "the epoch is learned from entry 1"
        );
        assert_eq!(empty.position().unwrap().epoch, F);
    }

    #[test]
    fn a_reconnection_within_the_window_continues_without_a_gap() {
        let mut c = at(E, 50);
        assert_eq!(c.resume(edge(E, 10), edge(E, 80)), resumed(50, None));
        assert_eq!(c.accept(entry(E, 51)), Verdict::Apply { gap: None });
        // Exactly at the edge: the oldest entry held is the next one.
        let mut edge_case = at(E, 9);
        assert_eq!(edge_case.resume(edge(E, 10), edge(E, 80)), resumed(9, None));
        // Caught up, nothing new.
        let mut idle = at(E, 80);
        assert_eq!(idle.resume(edge(E, 10), edge(E, 80)), resumed(80, None));
    }

    #[test]
    fn a_position_trimmed_away_is_a_gap_and_reading_goes_on_from_the_oldest_entry() {
        let mut c = at(E, 50);
        assert_eq!(
            c.resume(edge(E, 61), edge(E, 900)),
            resumed(60, Some(Gap::Trimmed { lost: 10 }))
        );
        assert_eq!(c.accept(entry(E, 61)), Verdict::Apply { gap: None });
    }

    #[test]
    fn trimming_between_the_check_and_the_read_is_caught_by_the_entry_numbers() {
        let mut c = at(E, 50);
        assert_eq!(c.resume(edge(E, 40), edge(E, 60)), resumed(50, None));
        assert_eq!(
            c.accept(entry(E, 58)),
            Verdict::Apply {
                gap: Some(Gap::Trimmed { lost: 7 })
            }
        );
        assert_eq!(c.accept(entry(E, 59)), Verdict::Apply { gap: None });
        assert_eq!(c.accept(entry(E, 59)), Verdict::Skip, "never twice");
        assert_eq!(c.accept(entry(E, 3)), Verdict::Skip);
    }

    #[test]
    fn a_lost_stream_is_a_gap_and_the_next_epoch_is_read_from_its_start() {
        // Redis restarted without persistence: the stream is gone.
        let mut c = at(E, 50);
        assert_eq!(c.resume(None, None), resumed(0, Some(Gap::NewEpoch)));
        assert_eq!(c.resume(None, None), resumed(0, None), "reported once");
        assert_eq!(c.accept(entry(F, 1)), Verdict::Apply { gap: None });
        // Another node published first: the new epoch is already there.
        let mut c = at(E, 50);
        assert_eq!(
            c.resume(edge(F, 1), edge(F, 3)),
            resumed(0, Some(Gap::NewEpoch))
        );
        assert_eq!(c.accept(entry(F, 1)), Verdict::Apply { gap: None });
        // Numbers of the new epoch past the old position do not hide the change.
        let mut c = at(E, 2);
        assert_eq!(
            c.resume(edge(F, 1), edge(F, 9)),
            resumed(0, Some(Gap::NewEpoch))
        );
    }

    #[test]
    fn a_stream_replaced_while_reading_stops_the_batch_for_a_resume() {
        let mut c = at(E, 50);
        assert_eq!(c.accept(entry(F, 51)), Verdict::Resume);
        assert_eq!(c.position().unwrap().applied, 50, "not applied");
        assert_eq!(
            c.resume(edge(F, 1), edge(F, 51)),
            resumed(0, Some(Gap::NewEpoch))
        );
    }

    #[test]
    fn a_failover_that_lost_applied_entries_rewinds_without_a_gap() {
        let mut c = at(E, 50);
        assert_eq!(
            c.resume(edge(E, 1), edge(E, 47)),
            Resume {
                after: 47,
                gap: None,
                rewound: true
            }
        );
        // The new primary's next entries reuse 48.. for new messages: all applied.
        assert_eq!(c.accept(entry(E, 48)), Verdict::Apply { gap: None });
    }

    #[test]
    fn a_stream_that_appeared_after_the_last_look_is_read_from_entry_one() {
        let mut c = at(0, 0);
        assert_eq!(c.resume(edge(F, 1), edge(F, 5)), resumed(0, None));
        assert_eq!(c.accept(entry(F, 1)), Verdict::Apply { gap: None });
        let mut late = at(0, 0);
        assert_eq!(
            late.resume(edge(F, 4), edge(F, 5)),
            resumed(3, Some(Gap::Trimmed { lost: 3 }))
        );
        let mut raced = at(0, 0);
        assert_eq!(raced.resume(None, None), resumed(0, None));
        assert_eq!(
            raced.accept(entry(F, 3)),
            Verdict::Apply {
                gap: Some(Gap::Trimmed { lost: 2 })
            }
        );
    }

    #[test]
    fn a_handed_over_position_continues_exactly_where_the_predecessor_stopped() {
        let mut predecessor = at(E, 10);
        for n in 11..=20 {
            assert_eq!(
                predecessor.accept(entry(E, n)),
                Verdict::Apply { gap: None }
            );
        }
        let handed: BusPosition = predecessor.position().unwrap().to_string().parse().unwrap();
        let mut successor = Cursor::new(Some(handed));
        assert_eq!(successor.resume(edge(E, 1), edge(E, 25)), resumed(20, None));
        assert_eq!(successor.accept(entry(E, 21)), Verdict::Apply { gap: None });
    }

    #[test]
    fn room_keeps_every_mailbox_within_the_bound() {
        assert_eq!(room(0, 4096, 512), 512);
        assert_eq!(room(3_800, 4096, 512), 295);
        assert_eq!(room(4_095, 4096, 512), 0);
        assert_eq!(room(9_000, 4096, 512), 0);
        // Whatever the reader takes, the fullest mailbox ends at most at the bound (one more for a gap notice).
        for fullest in 0..4096 {
            assert!(fullest + room(fullest, 4096, 512) < 4096);
        }
    }

    #[test]
    fn a_heavy_entry_fits_under_the_bound_or_into_empty_mailboxes() {
        assert!(fits(0, 4096, 1));
        assert!(fits(4094, 4096, 1), "as room(4094) is 1");
        assert!(!fits(4095, 4096, 1));
        assert!(fits(3000, 4096, 1095));
        assert!(!fits(3000, 4096, 1096), "one is kept for a gap notice");
        assert!(fits(0, 4096, 10_000), "heavier than the bound: alone");
        assert!(!fits(1, 4096, 10_000));
        // The same rule as room for entries that weigh one.
        for fullest in 0..4200 {
            assert_eq!(
                fits(fullest, 4096, 1),
                fullest == 0 || room(fullest, 4096, 512) > 0
            );
        }
    }

    #[test]
    fn batch_size_shrinks_after_large_entries_and_grows_back() {
        let mut b = BatchSize::new(512);
        assert_eq!(b.count(), 512);
        b.after_read(512, 512 * 100);
        assert_eq!(b.count(), 512);
        // 64 entries of 1 MiB: about 4 per read.
        b.after_read(64, 64 << 20);
        assert_eq!(b.count(), 4);
        b.after_read(1, 16 << 20);
        assert_eq!(b.count(), 1, "never below one");
        b.after_read(1, 10);
        b.after_read(2, 10);
        assert_eq!(b.count(), 4);
        b.after_read(1, 10);
        assert_eq!(b.count(), 4, "a short read is not a reason to grow");
    }
}
