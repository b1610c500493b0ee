//! The per-reactor fanout index: user, client token and channel → connection slab keys.
//!
//! It owns the user and channel names (interned once per reactor, not once per connection) and each
//! connection's membership record, kept in a vector indexed by slab key beside the connection slab. It does
//! not own connections or decide what to send. Memory per connection is the point: a user's connections are
//! an intrusive doubly linked list threaded through the membership records, so a user with one or two
//! connections costs one table entry and no allocation; channel member lists are vectors with each member's
//! position remembered, so joining and leaving are O(1) even for a channel with a million members. Client
//! tokens are per device, so they are kept inline in the membership record and matched while walking the
//! user's (short) list, instead of being interned in a table that would share nothing.
//!
//! Channel memberships can also change while a connection is open (`join`, `leave`: the admin API's runtime
//! subscriptions). A connection pays for a link only while it uses one: the first membership takes the inline
//! slot, only a second allocates, and leaving gives the allocation back, so an idle connection that never
//! changes subscription costs exactly what it did before.
//!
//! The caller must `remove` a key before the slab frees it, so a reused key never inherits memberships.

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashTable};
use slab::Slab;
use std::hash::BuildHasher;

/// Slab key of a connection.
pub type ConnKey = u32;
/// Interned name id inside one table.
type NameId = u32;
/// "No key / no id".
const NIL: u32 = u32::MAX;

/// Names interned once per reactor: a hash table of ids over a slab of (name, value).
/// Short names (up to 24 bytes) live inline in the entry, so an interned id costs no extra allocation.
#[derive(Debug)]
struct NameTable<V> {
    hasher: DefaultHashBuilder,
    index: HashTable<NameId>,
    entries: Slab<(CompactString, V)>,
}

impl<V> NameTable<V> {
    fn new() -> Self {
        Self::with_capacity(0)
    }

    /// Reserves the entries' slab (address space; the hash index still grows as needed, since a reserved
    /// hash table would initialise its control bytes and make them resident).
    fn with_capacity(entries: usize) -> Self {
        NameTable {
            hasher: DefaultHashBuilder::default(),
            index: HashTable::new(),
            entries: Slab::with_capacity(entries),
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

/// A user's connections: head of the intrusive list and its length.
#[derive(Debug)]
struct UserList {
    head: ConnKey,
    count: u32,
}

/// One channel membership of a connection, with its position in the channel's member vector.
#[derive(Debug, Clone, Copy)]
struct ChannelLink {
    channel: NameId,
    pos: u32,
}

/// Membership record of one connection (indexed by slab key). `user == NIL` means "not indexed".
///
/// Laid out for the common connection: one user, at most one channel, and a client token that is unique
/// to its device. The token is kept inline (up to 24 bytes without allocating) rather than interned: a
/// per-reactor table of device tokens would cost a table entry per connection for nothing shared. The
/// first channel membership is inline too; only connections in two or more channels allocate.
#[derive(Debug)]
struct Member {
    user: NameId,
    prev: ConnKey,
    next: ConnKey,
    /// First channel membership; `channel == NIL` when there is none.
    first: ChannelLink,
    /// Memberships after the first, only for connections in two or more channels. Boxed on purpose: a thin
    /// 8-byte pointer in every record, where a `Vec` would be 24 bytes for the rare connection that needs it.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<ChannelLink>>>,
    /// Client token; empty when the connection has none (an empty token is refused at the handshake).
    client: CompactString,
}

impl Member {
    const NO_CHANNEL: ChannelLink = ChannelLink {
        channel: NIL,
        pos: 0,
    };

    fn empty() -> Member {
        Member {
            user: NIL,
            prev: NIL,
            next: NIL,
            first: Self::NO_CHANNEL,
            more: None,
            client: CompactString::default(),
        }
    }

    fn links_mut(&mut self) -> impl Iterator<Item = &mut ChannelLink> {
        let first = (self.first.channel != NIL).then_some(&mut self.first);
        first
            .into_iter()
            .chain(self.more.iter_mut().flat_map(|more| more.iter_mut()))
    }

    /// Memberships held: the inline one and the spilled ones.
    fn link_count(&self) -> usize {
        usize::from(self.first.channel != NIL) + self.more.as_ref().map_or(0, |more| more.len())
    }

    fn has_channel(&self, channel: NameId) -> bool {
        self.first.channel == channel
            || self
                .more
                .as_ref()
                .is_some_and(|more| more.iter().any(|l| l.channel == channel))
    }

    /// Adds a membership: the inline slot when it is free, else the spilled list (allocated on first use).
    fn push_link(&mut self, link: ChannelLink) {
        if self.first.channel == NIL {
            self.first = link;
        } else {
            self.more.get_or_insert_with(Box::default).push(link);
        }
    }

    /// Takes the membership of `channel` out of the record, if it has one. A spilled link moves into a freed
    /// inline slot, and an emptied spill list is freed: leaving gives back what joining allocated.
    fn take_link(&mut self, channel: NameId) -> Option<ChannelLink> {
        let taken = if self.first.channel == channel {
            let link = self.first;
            self.first = self
                .more
                .as_mut()
                .and_then(|more| more.pop())
                .unwrap_or(Self::NO_CHANNEL);
            link
        } else {
            let more = self.more.as_mut()?;
            let at = more.iter().position(|l| l.channel == channel)?;
            more.swap_remove(at)
        };
        if self.more.as_ref().is_some_and(|more| more.is_empty()) {
            self.more = None;
        }
        Some(taken)
    }

    fn into_links(self) -> impl Iterator<Item = ChannelLink> {
        let first = (self.first.channel != NIL).then_some(self.first);
        first
            .into_iter()
            .chain(self.more.into_iter().flat_map(|more| *more))
    }
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
    users: NameTable<UserList>,
    channels: NameTable<Vec<ConnKey>>,
    members: Vec<Member>,
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
            // At most one user per connection: reserve as many entries as keys.
            users: NameTable::with_capacity(keys),
            channels: NameTable::new(),
            members: Vec::with_capacity(keys),
            indexed: 0,
            with_client: 0,
        }
    }

    /// Indexes connection `key` under its identity. The key must not be indexed already.
    pub fn add(&mut self, key: ConnKey, user: &str, client: Option<&str>, channels: &[String]) {
        let k = key as usize;
        if self.members.len() <= k {
            self.members.resize_with(k + 1, Member::empty);
        }
        debug_assert_eq!(self.members[k].user, NIL, "connection {key} indexed twice");

        let user_id = self.users.get_or_insert_with(user, || UserList {
            head: NIL,
            count: 0,
        });
        let list = self.users.value_mut(user_id);
        let old_head = list.head;
        list.head = key;
        list.count += 1;
        if old_head != NIL {
            self.members[old_head as usize].prev = key;
        }

        let client = client.unwrap_or_default();
        debug_assert!(client.len() <= u32::MAX as usize);
        if !client.is_empty() {
            self.with_client += 1;
        }

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
        let more = (!rest.is_empty()).then(|| Box::new(rest));

        self.members[k] = Member {
            user: user_id,
            prev: NIL,
            next: old_head,
            first,
            more,
            client: CompactString::from(client),
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
        let member = std::mem::replace(member, Member::empty());
        self.indexed -= 1;

        if member.prev != NIL {
            self.members[member.prev as usize].next = member.next;
        }
        if member.next != NIL {
            self.members[member.next as usize].prev = member.prev;
        }
        let list = self.users.value_mut(member.user);
        if list.head == key {
            list.head = member.next;
        }
        list.count -= 1;
        if list.count == 0 {
            self.users.remove(member.user);
        }

        if !member.client.is_empty() {
            self.with_client -= 1;
        }

        for link in member.into_links() {
            self.unlink(key, link);
        }
    }

    /// Takes `key` out of the member vector of `link`'s channel (its record no longer holds the link).
    fn unlink(&mut self, key: ConnKey, link: ChannelLink) {
        let list = self.channels.value_mut(link.channel);
        let removed = list.swap_remove(link.pos as usize);
        debug_assert_eq!(removed, key);
        if let Some(&moved) = list.get(link.pos as usize) {
            // The last member moved into our slot: fix its remembered position.
            let moved_member = &mut self.members[moved as usize];
            if let Some(l) = moved_member.links_mut().find(|l| l.channel == link.channel) {
                l.pos = link.pos;
            }
        }
        if list.is_empty() {
            self.channels.remove(link.channel);
        }
    }

    /// Subscribes indexed connection `key` to `channel`, unless it is a member already or holds
    /// `max_channels` memberships (the same bound a token's channels have, `auth.max_channels`).
    pub fn join(&mut self, key: ConnKey, channel: &str, max_channels: usize) -> Joined {
        let Some(member) = self.members.get(key as usize).filter(|m| m.user != NIL) else {
            debug_assert!(false, "join of connection {key}, which is not indexed");
            return Joined::Already;
        };
        if self
            .channels
            .find(channel)
            .is_some_and(|id| member.has_channel(id))
        {
            return Joined::Already;
        }
        if member.link_count() >= max_channels {
            return Joined::AtLimit;
        }
        let id = self.channels.get_or_insert_with(channel, Vec::new);
        let list = self.channels.value_mut(id);
        list.push(key);
        let link = ChannelLink {
            channel: id,
            pos: (list.len() - 1) as u32,
        };
        self.members[key as usize].push_link(link);
        Joined::Added
    }

    /// Unsubscribes indexed connection `key` from `channel`; false when it was not a member.
    pub fn leave(&mut self, key: ConnKey, channel: &str) -> bool {
        let Some(id) = self.channels.find(channel) else {
            return false;
        };
        let Some(link) = self
            .members
            .get_mut(key as usize)
            .filter(|m| m.user != NIL)
            .and_then(|m| m.take_link(id))
        else {
            return false;
        };
        self.unlink(key, link);
        true
    }

    /// The user and client token connection `key` is indexed under; `None` when it is not indexed.
    pub fn identity(&self, key: ConnKey) -> Option<(&str, Option<&str>)> {
        let member = self.members.get(key as usize).filter(|m| m.user != NIL)?;
        let client = (!member.client.is_empty()).then_some(member.client.as_str());
        Some((self.users.name(member.user), client))
    }

    /// How connection `key` is indexed (user, client token, channels), for a successor process to index it the
    /// same way (the live upgrade); `None` if it is not indexed.
    pub fn membership(&self, key: ConnKey) -> Option<(&str, Option<&str>, Vec<&str>)> {
        let member = self.members.get(key as usize)?;
        if member.user == NIL {
            return None;
        }
        let user = self.users.entries[member.user as usize].0.as_str();
        let client = (!member.client.is_empty()).then_some(member.client.as_str());
        let first = (member.first.channel != NIL).then_some(member.first);
        let channels = first
            .iter()
            .chain(member.more.iter().flat_map(|more| more.iter()))
            .map(|link| self.channels.entries[link.channel as usize].0.as_str())
            .collect();
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

    fn collect_user(&self, user: &str, client: Option<&str>, out: &mut Vec<ConnKey>) {
        let Some(user_id) = self.users.find(user) else {
            return;
        };
        let mut key = self.users.value(user_id).head;
        while key != NIL {
            let member = &self.members[key as usize];
            if client.is_none_or(|c| member.client == c) {
                out.push(key);
            }
            key = member.next;
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
        let channels = first
            .into_iter()
            .chain(member.more.iter().flat_map(|more| more.iter()))
            .map(|link| self.channels.name(link.channel));
        Some((self.users.name(member.user), channels))
    }

    /// Number of connections of `user` in this reactor.
    pub fn user_count(&self, user: &str) -> usize {
        self.users
            .find(user)
            .map_or(0, |id| self.users.value(id).count as usize)
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
        // One per connection: user, list links, one inline channel, a pointer for more, an inline token.
        assert!(
            std::mem::size_of::<Member>() <= 56,
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
        let spilled = |f: &Fanout, k: usize| f.members[k].more.is_some();
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
