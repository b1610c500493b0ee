//! The per-reactor fanout index: user, client token and channel → connection slab keys.
//!
//! It owns the user and channel names (interned once per reactor, not once per connection) and each
//! connection's membership record, kept in a vector indexed by slab key beside the connection slab. It does
//! not own connections or decide what to send. Memory per connection is the point (issue 15: an idle
//! connection under 100 bytes, index included):
//!
//! - a membership record is 24 bytes of 4-byte fields: the user's name (an arena offset), the links of the user's intrusive doubly
//!   linked list of connections, the client token's offset in the reactor's string arena (`arena`) and the first
//!   channel membership inline;
//! - user ids and client tokens are strings in that arena (a short one costs 8 bytes, no allocation);
//! - a user is one slot of a hash table holding the slab key of its list's head (the name is the arena string
//!   its records point to); a user's connection count is not kept but walked, only presence asks for it;
//! - channel member lists are vectors with each member's position remembered, so joining and leaving are O(1)
//!   even for a channel with a million members.
//!
//! Channel memberships can also change while a connection is open (`join`, `leave`: the admin API's runtime
//! subscriptions). A connection pays for a link only while it uses one: the first membership takes the inline
//! slot, a second and later ones go to a side table keyed by slab key, and leaving gives them back, so an idle
//! connection that never changes subscription costs exactly what it did before.
//!
//! The caller must `remove` a key before the slab frees it, so a reused key never inherits memberships.

pub mod arena;

use arena::{Arena, Offset};
use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use slab::Slab;
use std::hash::BuildHasher;

/// Slab key of a connection.
pub type ConnKey = u32;
/// Interned name id inside one table.
type NameId = u32;
/// "No key / no id / no string".
const NIL: u32 = u32::MAX;

/// Arena bytes reserved (address space) per slab key: a user id and a client token of up to 7 bytes each.
const ARENA_BYTES_PER_KEY: usize = 16;

/// Channel names interned once per reactor: a hash table of ids over a slab of (name, members). Channels are
/// few next to connections, so their entries are not squeezed.
#[derive(Debug)]
struct NameTable<V> {
    hasher: DefaultHashBuilder,
    index: HashTable<NameId>,
    entries: Slab<(CompactString, V)>,
}

impl<V> NameTable<V> {
    fn new() -> Self {
        NameTable {
            hasher: DefaultHashBuilder::default(),
            index: HashTable::new(),
            entries: Slab::new(),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn find(&self, name: &str) -> Option<NameId> {
        let hash = self.hasher.hash_one(name);
        self.index
            .find(hash, |&id| self.entries[id as usize].0 == name)
            .copied()
    }

    fn get_or_insert_with(&mut self, name: &str, make: impl FnOnce() -> V) -> NameId {
        if let Some(id) = self.find(name) {
            return id;
        }
        let id = self.entries.insert((CompactString::from(name), make())) as NameId;
        let hash = self.hasher.hash_one(name);
        let (hasher, entries) = (&self.hasher, &self.entries);
        self.index.insert_unique(hash, id, |&other| {
            hasher.hash_one(entries[other as usize].0.as_str())
        });
        id
    }

    fn name(&self, id: NameId) -> &str {
        &self.entries[id as usize].0
    }

    fn value(&self, id: NameId) -> &V {
        &self.entries[id as usize].1
    }

    fn value_mut(&mut self, id: NameId) -> &mut V {
        &mut self.entries[id as usize].1
    }

    fn remove(&mut self, id: NameId) {
        let hash = self.hasher.hash_one(self.entries[id as usize].0.as_str());
        if let Ok(entry) = self.index.find_entry(hash, |&other| other == id) {
            entry.remove();
        }
        self.entries.remove(id as usize);
    }
}

/// The users of one reactor: a hash table whose only content is, per user, the slab key of the head of its
/// connections' list (4 bytes and a control byte). The user's name is not stored beside it: it is the arena
/// string every membership record of the user points to, read through the head's record.
#[derive(Debug)]
struct Users {
    hasher: DefaultHashBuilder,
    index: HashTable<ConnKey>,
}

impl Users {
    fn new() -> Users {
        Users {
            hasher: DefaultHashBuilder::default(),
            // Grows as needed: a reserved hash table would initialise its control bytes and make them resident.
            index: HashTable::new(),
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// The head of `name`'s list, if the user has connections here.
    fn head(&self, name: &str, members: &[Member], arena: &Arena) -> Option<ConnKey> {
        let hash = self.hasher.hash_one(name);
        self.index
            .find(hash, |&head| arena.get(members[head as usize].user) == name)
            .copied()
    }
}

/// One channel membership of a connection, with its position in the channel's member vector.
#[derive(Debug, Clone, Copy)]
struct ChannelLink {
    channel: NameId,
    pos: u32,
}

/// Membership record of one connection (indexed by slab key), 24 bytes. `user` is the offset of the user's
/// name in the arena, shared by every record of the user; `user == NIL` means "not indexed".
///
/// Laid out for the common connection: one user, at most one channel, and a client token that is unique to
/// its device. The token is an offset in the arena (`NIL` without one) rather than interned: a per-reactor
/// table of device tokens would cost a table entry per connection for nothing shared. The first channel
/// membership is inline; only connections in two or more channels have more, in `Fanout::more`.
#[derive(Debug, Clone, Copy)]
struct Member {
    user: Offset,
    prev: ConnKey,
    next: ConnKey,
    client: Offset,
    /// First channel membership; `channel == NIL` when there is none.
    first: ChannelLink,
}

impl Member {
    const NO_CHANNEL: ChannelLink = ChannelLink {
        channel: NIL,
        pos: 0,
    };

    const EMPTY: Member = Member {
        user: NIL,
        prev: NIL,
        next: NIL,
        client: NIL,
        first: Self::NO_CHANNEL,
    };
}

/// What [`Fanout::join`] did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The connection is now a member of the channel.
    Added,
    /// It already was: nothing changed (a subscription is idempotent).
    Already,
    /// It holds `max_channels` memberships already: nothing changed.
    AtLimit,
}

/// Sizes of the index, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FanoutSizes {
    /// Indexed connections.
    pub connections: usize,
    /// Distinct users.
    pub users: usize,
    /// Indexed connections that carry a client token.
    pub clients: usize,
    /// Channels with at least one member.
    pub channels: usize,
}

/// The fanout index of one reactor.
#[derive(Debug)]
pub struct Fanout {
    /// User ids and client tokens.
    arena: Arena,
    users: Users,
    channels: NameTable<Vec<ConnKey>>,
    members: Vec<Member>,
    /// Memberships after the first, only for connections in two or more channels.
    more: HashMap<ConnKey, Vec<ChannelLink>>,
    indexed: usize,
    /// Indexed connections with a client token.
    with_client: usize,
}

impl Default for Fanout {
    fn default() -> Self {
        Self::new()
    }
}

impl Fanout {
    /// An empty index.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty index with room reserved for membership records of slab keys below `keys`. The reservation
    /// is address space only: pages become resident as keys are used, so a large reservation costs nothing
    /// while idle and spares the index the doubling slack and the copies of a growing vector.
    pub fn with_capacity(keys: usize) -> Self {
        Fanout {
            arena: Arena::with_capacity(keys.saturating_mul(ARENA_BYTES_PER_KEY)),
            users: Users::new(),
            channels: NameTable::new(),
            members: Vec::with_capacity(keys),
            more: HashMap::new(),
            indexed: 0,
            with_client: 0,
        }
    }

    /// Indexes connection `key` under its identity. The key must not be indexed already.
    pub fn add(&mut self, key: ConnKey, user: &str, client: Option<&str>, channels: &[String]) {
        let k = key as usize;
        if self.members.len() <= k {
            self.members.resize(k + 1, Member::EMPTY);
        }
        debug_assert_eq!(self.members[k].user, NIL, "connection {key} indexed twice");

        // The user's list gets `key` as its new head: the table's slot is repointed, or made, with the name the
        // old head's record points to, or a new one.
        let hash = self.users.hasher.hash_one(user);
        let (arena, members) = (&self.arena, &self.members);
        let found = self
            .users
            .index
            .find_mut(hash, |&head| arena.get(members[head as usize].user) == user);
        let (name, old_head) = match found {
            Some(head) => {
                let old = std::mem::replace(head, key);
                (self.members[old as usize].user, old)
            }
            None => (self.arena.insert(user), NIL),
        };
        if old_head != NIL {
            self.members[old_head as usize].prev = key;
        }
        // The record must name the user before the table may rehash through it.
        self.members[k].user = name;
        if old_head == NIL {
            let (arena, members, hasher) = (&self.arena, &self.members, &self.users.hasher);
            self.users.index.insert_unique(hash, key, |&head| {
                hasher.hash_one(arena.get(members[head as usize].user))
            });
        }

        // An empty token is refused at the handshake; here it means none.
        let client = match client.filter(|c| !c.is_empty()) {
            Some(c) => {
                self.with_client += 1;
                self.arena.insert(c)
            }
            None => NIL,
        };

        let mut links = channels.iter().map(|name| {
            let channel = self.channels.get_or_insert_with(name, Vec::new);
            let list = self.channels.value_mut(channel);
            list.push(key);
            ChannelLink {
                channel,
                pos: (list.len() - 1) as u32,
            }
        });
        let first = links.next().unwrap_or(Member::NO_CHANNEL);
        let rest: Vec<ChannelLink> = links.collect();
        if !rest.is_empty() {
            self.more.insert(key, rest);
        }

        self.members[k] = Member {
            user: name,
            prev: NIL,
            next: old_head,
            client,
            first,
        };
        self.indexed += 1;
    }

    /// Removes connection `key` from every index; a key that is not indexed is ignored.
    pub fn remove(&mut self, key: ConnKey) {
        let Some(member) = self.members.get_mut(key as usize) else {
            return;
        };
        if member.user == NIL {
            return;
        }
        let member = std::mem::replace(member, Member::EMPTY);
        self.indexed -= 1;

        if member.prev != NIL {
            self.members[member.prev as usize].next = member.next;
        }
        if member.next != NIL {
            self.members[member.next as usize].prev = member.prev;
        }
        if member.prev == NIL {
            // It was the head: the table's slot moves to the next one, or the user is gone with its name.
            let hash = self.users.hasher.hash_one(self.arena.get(member.user));
            match self.users.index.find_entry(hash, |&head| head == key) {
                Ok(mut slot) if member.next != NIL => *slot.get_mut() = member.next,
                Ok(slot) => {
                    slot.remove();
                    self.arena.remove(member.user);
                }
                Err(_) => debug_assert!(false, "the head of a list is in the table"),
            }
        }

        if member.client != NIL {
            self.with_client -= 1;
            self.arena.remove(member.client);
        }

        if member.first.channel != NIL {
            self.unlink(key, member.first);
            if let Some(more) = self.more.remove(&key) {
                for link in more {
                    self.unlink(key, link);
                }
            }
        }
    }

    /// The memberships of `key`: the inline one, then those in the side table.
    fn links_mut<'a>(
        first: &'a mut ChannelLink,
        more: &'a mut HashMap<ConnKey, Vec<ChannelLink>>,
        key: ConnKey,
    ) -> impl Iterator<Item = &'a mut ChannelLink> {
        let spilled = if first.channel != NIL && !more.is_empty() {
            more.get_mut(&key)
        } else {
            None
        };
        let first = (first.channel != NIL).then_some(first);
        first
            .into_iter()
            .chain(spilled.into_iter().flat_map(|v| v.iter_mut()))
    }

    /// Takes `key` out of the member vector of `link`'s channel (its record no longer holds the link).
    fn unlink(&mut self, key: ConnKey, link: ChannelLink) {
        let list = self.channels.value_mut(link.channel);
        let removed = list.swap_remove(link.pos as usize);
        debug_assert_eq!(removed, key);
        if let Some(&moved) = list.get(link.pos as usize) {
            // The last member moved into our slot: fix its remembered position.
            let first = &mut self.members[moved as usize].first;
            if let Some(l) =
                Self::links_mut(first, &mut self.more, moved).find(|l| l.channel == link.channel)
            {
                l.pos = link.pos;
            }
        }
        if list.is_empty() {
            self.channels.remove(link.channel);
        }
    }

    /// Memberships held by indexed connection `key`.
    fn link_count(&self, key: ConnKey) -> usize {
        let member = &self.members[key as usize];
        usize::from(member.first.channel != NIL) + self.more.get(&key).map_or(0, |more| more.len())
    }

    fn has_channel(&self, key: ConnKey, channel: NameId) -> bool {
        self.members[key as usize].first.channel == channel
            || self
                .more
                .get(&key)
                .is_some_and(|more| more.iter().any(|l| l.channel == channel))
    }

    /// Subscribes indexed connection `key` to `channel`, unless it is a member already or holds
    /// `max_channels` memberships (the same bound a token's channels have, `auth.max_channels`).
    pub fn join(&mut self, key: ConnKey, channel: &str, max_channels: usize) -> Joined {
        if self.members.get(key as usize).is_none_or(|m| m.user == NIL) {
            debug_assert!(false, "join of connection {key}, which is not indexed");
            return Joined::Already;
        }
        if self
            .channels
            .find(channel)
            .is_some_and(|id| self.has_channel(key, id))
        {
            return Joined::Already;
        }
        if self.link_count(key) >= max_channels {
            return Joined::AtLimit;
        }
        let id = self.channels.get_or_insert_with(channel, Vec::new);
        let list = self.channels.value_mut(id);
        list.push(key);
        let link = ChannelLink {
            channel: id,
            pos: (list.len() - 1) as u32,
        };
        let member = &mut self.members[key as usize];
        if member.first.channel == NIL {
            member.first = link;
        } else {
            self.more.entry(key).or_default().push(link);
        }
        Joined::Added
    }

    /// Unsubscribes indexed connection `key` from `channel`; false when it was not a member.
    pub fn leave(&mut self, key: ConnKey, channel: &str) -> bool {
        let Some(id) = self.channels.find(channel) else {
            return false;
        };
        let Some(member) = self.members.get_mut(key as usize).filter(|m| m.user != NIL) else {
            return false;
        };
        // Take the link out of the record: a spilled link moves into a freed inline slot, and an emptied side
        // entry is dropped, so leaving gives back what joining took.
        let link = if member.first.channel == id {
            let link = member.first;
            member.first = self
                .more
                .get_mut(&key)
                .and_then(|more| more.pop())
                .unwrap_or(Member::NO_CHANNEL);
            link
        } else {
            let Some(more) = self.more.get_mut(&key) else {
                return false;
            };
            let Some(at) = more.iter().position(|l| l.channel == id) else {
                return false;
            };
            more.swap_remove(at)
        };
        if self.more.get(&key).is_some_and(|more| more.is_empty()) {
            self.more.remove(&key);
        }
        self.unlink(key, link);
        true
    }

    /// The user and client token connection `key` is indexed under; `None` when it is not indexed.
    pub fn identity(&self, key: ConnKey) -> Option<(&str, Option<&str>)> {
        let member = self.members.get(key as usize).filter(|m| m.user != NIL)?;
        let client = (member.client != NIL).then(|| self.arena.get(member.client));
        let user = self.arena.get(member.user);
        Some((user, client))
    }

    /// Whether indexed connection `key` is the only one of its user here (so its arrival is the user's first,
    /// and its departure the user's last): its list has no other link.
    pub fn alone(&self, key: ConnKey) -> bool {
        self.members
            .get(key as usize)
            .is_some_and(|m| m.user != NIL && m.prev == NIL && m.next == NIL)
    }

    /// How connection `key` is indexed (user, client token, channels), for a successor process to index it the
    /// same way (the live upgrade); `None` if it is not indexed.
    pub fn membership(&self, key: ConnKey) -> Option<(&str, Option<&str>, Vec<&str>)> {
        let (user, channels) = self.names_of(key)?;
        let channels = channels.collect();
        let client = self.identity(key)?.1;
        Some((user, client, channels))
    }

    /// Appends the keys of every connection of `user` to `out`.
    pub fn user_conns(&self, user: &str, out: &mut Vec<ConnKey>) {
        self.collect_user(user, None, out);
    }

    /// Appends the keys of the connections of `user` that carry client token `client`.
    pub fn user_client_conns(&self, user: &str, client: &str, out: &mut Vec<ConnKey>) {
        // An empty token matches nothing (not "every connection without a token").
        if !client.is_empty() {
            self.collect_user(user, Some(client), out);
        }
    }

    fn user_keys(&self, user: &str) -> impl Iterator<Item = (ConnKey, &Member)> {
        let mut key = self
            .users
            .head(user, &self.members, &self.arena)
            .unwrap_or(NIL);
        std::iter::from_fn(move || {
            if key == NIL {
                return None;
            }
            let member = &self.members[key as usize];
            let this = key;
            key = member.next;
            Some((this, member))
        })
    }

    fn collect_user(&self, user: &str, client: Option<&str>, out: &mut Vec<ConnKey>) {
        for (key, member) in self.user_keys(user) {
            let matches = match client {
                None => true,
                Some(c) => member.client != NIL && self.arena.get(member.client) == c,
            };
            if matches {
                out.push(key);
            }
        }
    }

    /// Appends the keys of every connection subscribed to `channel`.
    pub fn channel_conns(&self, channel: &str, out: &mut Vec<ConnKey>) {
        if let Some(id) = self.channels.find(channel) {
            out.extend_from_slice(self.channels.value(id));
        }
    }

    /// The user and the channels connection `key` is indexed under (`None` if it is not indexed): the streams a
    /// notice about everything it receives must name.
    pub fn names_of(&self, key: ConnKey) -> Option<(&str, impl Iterator<Item = &str> + '_)> {
        let member = self.members.get(key as usize).filter(|m| m.user != NIL)?;
        let first = (member.first.channel != NIL).then_some(&member.first);
        let spilled = first.and_then(|_| self.more.get(&key));
        let channels = first
            .into_iter()
            .chain(spilled.into_iter().flat_map(|more| more.iter()))
            .map(|link| self.channels.name(link.channel));
        let user = self.arena.get(member.user);
        Some((user, channels))
    }

    /// Number of connections of `user` in this reactor (walked: O(its connections)).
    pub fn user_count(&self, user: &str) -> usize {
        self.user_keys(user).count()
    }

    /// Sizes of the index.
    pub fn sizes(&self) -> FanoutSizes {
        FanoutSizes {
            connections: self.indexed,
            users: self.users.len(),
            clients: self.with_client,
            channels: self.channels.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn sorted(mut v: Vec<ConnKey>) -> Vec<ConnKey> {
        v.sort();
        v
    }

    fn user(f: &Fanout, u: &str) -> Vec<ConnKey> {
        let mut out = Vec::new();
        f.user_conns(u, &mut out);
        sorted(out)
    }

    fn user_client(f: &Fanout, u: &str, c: &str) -> Vec<ConnKey> {
        let mut out = Vec::new();
        f.user_client_conns(u, c, &mut out);
        sorted(out)
    }

    fn channel(f: &Fanout, c: &str) -> Vec<ConnKey> {
        let mut out = Vec::new();
        f.channel_conns(c, &mut out);
        sorted(out)
    }

    #[test]
    fn membership_gives_back_what_was_indexed_and_joined() {
        let mut f = Fanout::new();
        f.add(3, "alice", Some("phone"), &ch(&["news", "sport", "tech"]));
        f.add(4, "bob", None, &[]);
        assert_eq!(
            f.membership(3),
            Some(("alice", Some("phone"), vec!["news", "sport", "tech"]))
        );
        assert_eq!(f.membership(4), Some(("bob", None, vec![])));
        assert_eq!(f.membership(5), None);
        // Channels joined and left at run time are what a successor must index too.
        assert_eq!(f.join(4, "late", 16), Joined::Added);
        assert!(f.leave(3, "sport"));
        let (_, _, mut channels) = f.membership(3).unwrap();
        channels.sort();
        assert_eq!(channels, ["news", "tech"]);
        assert_eq!(f.membership(4), Some(("bob", None, vec!["late"])));
        f.remove(3);
        assert_eq!(f.membership(3), None);
    }

    #[test]
    fn user_lookup_returns_exactly_that_users_connections() {
        let mut f = Fanout::new();
        f.add(0, "alice", Some("phone"), &[]);
        f.add(1, "bob", None, &[]);
        f.add(2, "alice", Some("laptop"), &[]);
        assert_eq!(user(&f, "alice"), vec![0, 2]);
        assert_eq!(user(&f, "bob"), vec![1]);
        assert_eq!(user(&f, "carol"), Vec::<ConnKey>::new());
        assert_eq!(f.user_count("alice"), 2);
    }

    #[test]
    fn client_lookup_filters_by_token_within_the_user() {
        let mut f = Fanout::new();
        f.add(0, "alice", Some("phone"), &[]);
        f.add(1, "alice", Some("laptop"), &[]);
        f.add(2, "alice", Some("phone"), &[]);
        f.add(3, "bob", Some("phone"), &[]);
        f.add(4, "alice", None, &[]);
        assert_eq!(user_client(&f, "alice", "phone"), vec![0, 2]);
        assert_eq!(user_client(&f, "bob", "phone"), vec![3]);
        assert_eq!(user_client(&f, "alice", "tablet"), Vec::<ConnKey>::new());
    }

    #[test]
    fn names_of_a_connection_are_its_user_and_channels() {
        let mut f = Fanout::new();
        f.add(0, "alice", Some("phone"), &ch(&["news", "sport", "tv"]));
        f.add(1, "bob", None, &[]);
        let (user, channels) = f.names_of(0).unwrap();
        assert_eq!(
            (user, channels.collect::<Vec<_>>()),
            ("alice", vec!["news", "sport", "tv"])
        );
        let (user, channels) = f.names_of(1).unwrap();
        assert_eq!((user, channels.count()), ("bob", 0));
        f.remove(0);
        assert!(f.names_of(0).is_none());
        assert!(f.names_of(7).is_none());
    }

    #[test]
    fn removing_from_middle_head_and_tail_keeps_the_list_linked() {
        let mut f = Fanout::new();
        for k in 0..5 {
            f.add(k, "u", None, &[]);
        }
        f.remove(2); // middle
        assert_eq!(user(&f, "u"), vec![0, 1, 3, 4]);
        f.remove(4); // head (last added is the head)
        assert_eq!(user(&f, "u"), vec![0, 1, 3]);
        f.remove(0); // tail
        assert_eq!(user(&f, "u"), vec![1, 3]);
        assert_eq!(f.user_count("u"), 2);
        f.remove(1);
        f.remove(3);
        assert_eq!(f.sizes(), FanoutSizes::default());
    }

    #[test]
    fn channel_members_survive_swap_remove_position_fixups() {
        let mut f = Fanout::new();
        f.add(0, "a", None, &ch(&["news", "sport"]));
        f.add(1, "b", None, &ch(&["news"]));
        f.add(2, "c", None, &ch(&["sport", "news"]));
        f.add(3, "d", None, &ch(&["news"]));
        f.remove(0); // 3 moves into position 0 of "news"
        assert_eq!(channel(&f, "news"), vec![1, 2, 3]);
        assert_eq!(channel(&f, "sport"), vec![2]);
        f.remove(3); // must find its moved position, not the stale one
        assert_eq!(channel(&f, "news"), vec![1, 2]);
        f.remove(1);
        f.remove(2);
        assert_eq!(channel(&f, "news"), Vec::<ConnKey>::new());
        assert_eq!(f.sizes().channels, 0);
    }

    #[test]
    fn reused_key_starts_with_no_memberships() {
        let mut f = Fanout::new();
        f.add(7, "alice", Some("phone"), &ch(&["news"]));
        f.remove(7);
        f.add(7, "bob", None, &[]);
        assert_eq!(user(&f, "alice"), Vec::<ConnKey>::new());
        assert_eq!(user(&f, "bob"), vec![7]);
        assert_eq!(channel(&f, "news"), Vec::<ConnKey>::new());
        assert_eq!(user_client(&f, "bob", "phone"), Vec::<ConnKey>::new());
        assert_eq!(
            f.sizes(),
            FanoutSizes {
                connections: 1,
                users: 1,
                clients: 0,
                channels: 0
            }
        );
    }

    #[test]
    fn removing_an_unindexed_key_is_harmless() {
        let mut f = Fanout::new();
        f.remove(3);
        f.add(1, "a", None, &[]);
        f.remove(0);
        f.remove(1);
        f.remove(1);
        assert_eq!(f.sizes(), FanoutSizes::default());
    }

    #[test]
    fn names_are_freed_when_their_last_connection_leaves() {
        let mut f = Fanout::new();
        f.add(0, "alice", Some("phone"), &ch(&["x"]));
        f.add(1, "alice", Some("phone"), &ch(&["x"]));
        f.add(2, "alice", None, &ch(&["x"]));
        f.remove(2);
        assert_eq!(
            f.sizes(),
            FanoutSizes {
                connections: 2,
                users: 1,
                clients: 2,
                channels: 1
            }
        );
        f.remove(0);
        assert_eq!(
            f.sizes(),
            FanoutSizes {
                connections: 1,
                users: 1,
                clients: 1,
                channels: 1
            }
        );
        f.remove(1);
        assert_eq!(f.sizes(), FanoutSizes::default());
    }

    #[test]
    fn membership_record_stays_small() {
        // One per connection: user, list links, the token's offset, one inline channel.
        assert!(
            std::mem::size_of::<Member>() <= 24,
            "Member is {} bytes",
            std::mem::size_of::<Member>()
        );
    }

    #[test]
    fn many_channels_spill_past_the_inline_one_and_come_back() {
        let mut f = Fanout::new();
        f.add(0, "a", None, &ch(&["c1", "c2", "c3"]));
        f.add(1, "b", None, &ch(&["c3", "c1"]));
        f.remove(0);
        assert_eq!(channel(&f, "c1"), vec![1]);
        assert_eq!(channel(&f, "c2"), Vec::<ConnKey>::new());
        assert_eq!(channel(&f, "c3"), vec![1]);
        f.remove(1);
        assert_eq!(f.sizes(), FanoutSizes::default());
    }

    #[test]
    fn long_names_work_as_well_as_inline_ones() {
        let mut f = Fanout::new();
        let long = "u".repeat(100);
        f.add(0, &long, Some(&"c".repeat(60)), &[]);
        assert_eq!(user(&f, &long), vec![0]);
        assert_eq!(user_client(&f, &long, &"c".repeat(60)), vec![0]);
    }

    #[test]
    fn join_and_leave_change_only_that_connections_membership() {
        let mut f = Fanout::new();
        f.add(0, "alice", None, &[]);
        f.add(1, "bob", None, &ch(&["news"]));
        assert_eq!(f.join(0, "news", 32), Joined::Added);
        assert_eq!(channel(&f, "news"), vec![0, 1]);
        assert_eq!(f.join(0, "news", 32), Joined::Already, "idempotent");
        assert_eq!(channel(&f, "news"), vec![0, 1]);
        assert!(f.leave(1, "news"));
        assert!(!f.leave(1, "news"), "idempotent");
        assert!(!f.leave(1, "never"));
        assert_eq!(channel(&f, "news"), vec![0]);
        assert!(f.leave(0, "news"));
        assert_eq!(f.sizes().channels, 0, "an emptied channel is forgotten");
    }

    #[test]
    fn join_stops_at_max_channels_counting_the_tokens_channels() {
        let mut f = Fanout::new();
        f.add(0, "a", None, &ch(&["t1", "t2"]));
        assert_eq!(f.join(0, "r1", 3), Joined::Added);
        assert_eq!(f.join(0, "r2", 3), Joined::AtLimit);
        assert_eq!(
            f.join(0, "t1", 3),
            Joined::Already,
            "a member is not at the limit"
        );
        assert!(f.leave(0, "t1"));
        assert_eq!(f.join(0, "r2", 3), Joined::Added);
        assert_eq!(channel(&f, "r2"), vec![0]);
        assert_eq!(f.join(0, "x", 0), Joined::AtLimit);
    }

    #[test]
    fn a_link_is_paid_only_while_used() {
        let mut f = Fanout::new();
        f.add(0, "a", None, &[]);
        f.add(1, "b", None, &[]);
        let spilled = |f: &Fanout, k: u32| f.more.contains_key(&k);
        assert_eq!(f.join(0, "c1", 8), Joined::Added);
        assert!(
            !spilled(&f, 0),
            "the first membership takes the inline slot"
        );
        assert_eq!(f.join(0, "c2", 8), Joined::Added);
        assert!(spilled(&f, 0), "only a second one allocates");
        assert!(f.leave(0, "c1"));
        assert!(
            !spilled(&f, 0),
            "the spilled link moved inline and the list was freed"
        );
        assert_eq!(channel(&f, "c2"), vec![0]);
        assert!(
            !spilled(&f, 1),
            "a connection that never changed pays nothing"
        );
        assert!(f.leave(0, "c2"));
        assert_eq!(f.members[0].first.channel, NIL);
    }

    #[test]
    fn leaving_fixes_the_position_of_the_member_moved_into_the_gap() {
        let mut f = Fanout::new();
        for k in 0..4 {
            f.add(k, "u", None, &[]);
            assert_eq!(f.join(k, "c", 8), Joined::Added);
        }
        assert!(f.leave(0, "c")); // 3 moves into position 0
        f.remove(3); // must find its moved position
        assert_eq!(channel(&f, "c"), vec![1, 2]);
        for k in 0..3 {
            f.remove(k);
        }
        assert_eq!(f.sizes(), FanoutSizes::default());
    }

    #[test]
    fn identity_names_the_user_and_client_of_an_indexed_key() {
        let mut f = Fanout::new();
        f.add(3, "alice", Some("phone"), &[]);
        f.add(4, "bob", None, &[]);
        assert_eq!(f.identity(3), Some(("alice", Some("phone"))));
        assert_eq!(f.identity(4), Some(("bob", None)));
        assert_eq!(f.identity(5), None);
        f.remove(3);
        assert_eq!(f.identity(3), None);
    }

    #[test]
    fn random_add_remove_join_leave_matches_a_naive_model() {
        let mut f = Fanout::new();
        let mut model: Vec<Option<(String, Vec<String>)>> = vec![None; 32];
        let mut seed = 0x2545_f491_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const MAX: usize = 3;
        for _ in 0..5_000 {
            let k = (next() % 32) as usize;
            let c = format!("ch{}", next() % 5);
            match (&mut model[k], next() % 4) {
                (None, _) => {
                    let u = format!("user{}", next() % 4);
                    f.add(k as u32, &u, None, &[]);
                    model[k] = Some((u, Vec::new()));
                }
                (Some(_), 0) => {
                    f.remove(k as u32);
                    model[k] = None;
                }
                (Some((_, chans)), 1 | 2) => {
                    let expect = if chans.contains(&c) {
                        Joined::Already
                    } else if chans.len() >= MAX {
                        Joined::AtLimit
                    } else {
                        chans.push(c.clone());
                        Joined::Added
                    };
                    assert_eq!(f.join(k as u32, &c, MAX), expect);
                }
                (Some((_, chans)), _) => {
                    let was = chans.contains(&c);
                    chans.retain(|x| *x != c);
                    assert_eq!(f.leave(k as u32, &c), was);
                }
            }
            for n in 0..5 {
                let c = format!("ch{n}");
                let expect: Vec<ConnKey> = (0..32)
                    .filter(|&i| model[i].as_ref().is_some_and(|m| m.1.contains(&c)))
                    .map(|i| i as ConnKey)
                    .collect();
                assert_eq!(channel(&f, &c), expect);
            }
        }
    }

    #[test]
    fn random_add_remove_matches_a_naive_model() {
        // Deterministic pseudo-random churn checked against a brute-force model.
        let mut f = Fanout::new();
        type Identity = (String, Option<String>, Vec<String>);
        let mut model: Vec<Option<Identity>> = vec![None; 64];
        let mut seed = 0x9e37_79b9_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let k = (next() % 64) as usize;
            if model[k].is_some() {
                f.remove(k as u32);
                model[k] = None;
            } else {
                let u = format!("user{}", next() % 8);
                let c = if next() % 2 == 0 {
                    Some(format!("c{}", next() % 3))
                } else {
                    None
                };
                let chans: Vec<String> = (0..next() % 3)
                    .map(|i| format!("ch{}", (next() + i) % 4))
                    .collect();
                let mut chans_dedup = chans.clone();
                chans_dedup.sort();
                chans_dedup.dedup();
                f.add(k as u32, &u, c.as_deref(), &chans_dedup);
                model[k] = Some((u, c, chans_dedup));
            }
            for n in 0..8 {
                let u = format!("user{n}");
                let expect: Vec<ConnKey> = (0..64)
                    .filter(|&i| model[i].as_ref().is_some_and(|m| m.0 == u))
                    .map(|i| i as ConnKey)
                    .collect();
                assert_eq!(user(&f, &u), expect);
                let expect_c0: Vec<ConnKey> = (0..64)
                    .filter(|&i| {
                        model[i]
                            .as_ref()
                            .is_some_and(|m| m.0 == u && m.1.as_deref() == Some("c0"))
                    })
                    .map(|i| i as ConnKey)
                    .collect();
                assert_eq!(user_client(&f, &u, "c0"), expect_c0);
            }
            for n in 0..4 {
                let c = format!("ch{n}");
                let expect: Vec<ConnKey> = (0..64)
                    .filter(|&i| model[i].as_ref().is_some_and(|m| m.2.contains(&c)))
                    .map(|i| i as ConnKey)
                    .collect();
                assert_eq!(channel(&f, &c), expect);
            }
        }
    }
}
