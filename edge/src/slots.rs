//! A cap on what one client holds at once: tally's live result streams, each an open connection
//! that one client could otherwise open until every stream the process allows was its own.
//!
//! The map holds only clients that hold a slot (a [`Slot`] gives its own back when dropped), so
//! it is never larger than the slots held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::client::Client;

/// At most `per_client` slots per client.
#[derive(Debug)]
pub struct Slots {
    per_client: usize,
    held: Mutex<HashMap<Client, usize>>,
}

/// One slot of one client, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    client: Client,
}

impl Slots {
    pub fn new(per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, or `None` when it holds `per_client` already.
    pub fn take(self: &Arc<Self>, client: Client) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(client).or_insert(0);
        if *count >= self.per_client {
            if *count == 0 {
                held.remove(&client);
            }
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: Arc::clone(self),
            client,
        })
    }

    /// Clients that hold a slot.
    pub fn clients(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str) -> Client {
        Client::of(ip.parse().unwrap())
    }

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back() {
        let slots = Slots::new(2);
        let (a, b) = (client("192.0.2.1"), client("192.0.2.2"));
        let first = slots.take(a).expect("one");
        let second = slots.take(a).expect("two");
        assert!(slots.take(a).is_none(), "a third is refused");
        assert!(slots.take(b).is_some(), "another client is not affected");
        drop(first);
        let third = slots.take(a).expect("a slot given back is free again");
        drop((second, third));
        assert_eq!(slots.clients(), 0, "a client without slots is forgotten");
        assert!(Slots::new(0).take(a).is_none());
        assert_eq!(slots.clients(), 0);
    }
}
