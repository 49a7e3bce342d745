//! Per-subscription sequence tracking: finds duplicated and out-of-order
//! publications without keeping a set of everything received.

/// The sequence state of one (channel, publisher) stream at one subscriber.
/// Sequences start at 1 and grow by one per publication.
#[derive(Debug, Default, Clone)]
pub struct SeqTrack {
    last: u64,
    /// Skipped sequences not yet seen, as inclusive ranges in ascending order.
    missing: Vec<(u64, u64)>,
}

/// How one arrival relates to what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next sequence.
    InOrder,
    /// Newer than the next one: the ones between are missing (so far).
    Gap,
    /// A missing sequence that arrived after a newer one.
    Late,
    /// Seen before.
    Duplicate,
}

impl SeqTrack {
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq == self.last + 1 {
            self.last = seq;
            return Arrival::InOrder;
        }
        if seq > self.last {
            self.missing.push((self.last + 1, seq - 1));
            self.last = seq;
            return Arrival::Gap;
        }
        let Some(i) = self.missing.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return Arrival::Duplicate;
        };
        let (a, b) = self.missing[i];
        match (seq == a, seq == b) {
            (true, true) => {
                self.missing.remove(i);
            }
            (true, false) => self.missing[i].0 = seq + 1,
            (false, true) => self.missing[i].1 = seq - 1,
            (false, false) => {
                self.missing[i].1 = seq - 1;
                self.missing.insert(i + 1, (seq + 1, b));
            }
        }
        Arrival::Late
    }
}

/// Counts over many streams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Publications received, duplicates included.
    pub received: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

/// All streams one connection receives, keyed by (channel, publisher). A
/// connection sees few streams, so a vector beats a map.
#[derive(Debug, Default)]
pub struct Streams {
    streams: Vec<((u32, u32), SeqTrack)>,
    pub tally: Tally,
}

impl Streams {
    pub fn record(&mut self, channel: u32, publisher: u32, seq: u64) -> Arrival {
        let key = (channel, publisher);
        let i = match self.streams.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                self.streams.push((key, SeqTrack::default()));
                self.streams.len() - 1
            }
        };
        let a = self.streams[i].1.record(seq);
        self.tally.received += 1;
        match a {
            Arrival::Duplicate => self.tally.duplicated += 1,
            Arrival::Late => self.tally.out_of_order += 1,
            Arrival::InOrder | Arrival::Gap => {}
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_gaps_late_arrivals_and_duplicates() {
        let mut t = SeqTrack::default();
        assert_eq!(t.record(1), Arrival::InOrder);
        assert_eq!(t.record(2), Arrival::InOrder);
        assert_eq!(t.record(6), Arrival::Gap);
        assert_eq!(t.record(4), Arrival::Late);
        assert_eq!(t.record(4), Arrival::Duplicate);
        assert_eq!(t.record(3), Arrival::Late);
        assert_eq!(t.record(5), Arrival::Late);
        assert_eq!(t.record(2), Arrival::Duplicate);
        assert_eq!(t.record(7), Arrival::InOrder);
        assert!(t.missing.is_empty());
    }

    #[test]
    fn streams_count_per_key() {
        let mut s = Streams::default();
        s.record(1, 0, 1);
        s.record(1, 1, 1);
        s.record(1, 0, 1);
        s.record(1, 1, 3);
        s.record(1, 1, 2);
        assert_eq!(s.tally, Tally { received: 5, duplicated: 1, out_of_order: 1 });
    }
}
