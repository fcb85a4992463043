//! What each SQE carries back in its CQE: which request, which step of it, which range, and how
//! many bytes it must move. Encoded to and decoded from the 64-bit `user_data` here and nowhere
//! else.

/// One step of a request, as one SQE does it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// A read or write (one piece, or one run of pieces of a vectored request).
    Rw = 0,
    /// fdatasync of the image (FLUSH, or a writethrough discard/write-zeroes at its end).
    Fsync = 1,
    /// FALLOC_FL_ZERO_RANGE: zero in place, the range stays allocated.
    ZeroRange = 2,
    /// FALLOC_FL_PUNCH_HOLE for write-zeroes with UNMAP.
    Punch = 3,
    /// FALLOC_FL_PUNCH_HOLE for DISCARD (advisory: "not supported" is success).
    Discard = 4,
    /// A hole punched as the first half of zeroing in place where the filesystem cannot zero a
    /// range (tmpfs): its completion allocates the range again (`Alloc`), so that write-zeroes
    /// without UNMAP leaves the range allocated, as the guest asked.
    PunchRealloc = 5,
    /// Plain fallocate: the second half of `PunchRealloc`.
    Alloc = 6,
}

impl Step {
    /// Every step, for tests and decoding.
    pub const ALL: [Step; 7] = [
        Step::Rw,
        Step::Fsync,
        Step::ZeroRange,
        Step::Punch,
        Step::Discard,
        Step::PunchRealloc,
        Step::Alloc,
    ];

    fn from_bits(b: u8) -> Option<Step> {
        Step::ALL.get(usize::from(b)).copied()
    }
}

/// The user data of one SQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserData {
    /// The request's descriptor head (its slot).
    pub head: u16,
    pub step: Step,
    /// Which discard/write-zeroes range of the request (0 for the other steps).
    pub range: u8,
    /// Bytes a read or write must move to succeed (0 for the other steps).
    pub expected: u32,
}

// A request's ranges are indexed by a u8.
const _: () = assert!(crate::config::MAX_DISCARD_SEG <= u8::MAX as u32 + 1);

// Layout: head (bits 0-15) | step (16-23) | range (24-31) | expected length (32-63).
const STEP_SHIFT: u32 = 16;
const RANGE_SHIFT: u32 = 24;
const EXPECTED_SHIFT: u32 = 32;

impl UserData {
    pub fn new(head: u16, step: Step) -> Self {
        UserData {
            head,
            step,
            range: 0,
            expected: 0,
        }
    }

    pub fn range(self, range: u8) -> Self {
        UserData { range, ..self }
    }

    pub fn expected(self, expected: u32) -> Self {
        UserData { expected, ..self }
    }

    pub fn encode(self) -> u64 {
        u64::from(self.head)
            | u64::from(self.step as u8) << STEP_SHIFT
            | u64::from(self.range) << RANGE_SHIFT
            | u64::from(self.expected) << EXPECTED_SHIFT
    }

    /// None for a value no [`UserData::encode`] made (an unknown step).
    pub fn decode(v: u64) -> Option<Self> {
        Some(UserData {
            head: v as u16,
            step: Step::from_bits((v >> STEP_SHIFT) as u8)?,
            range: (v >> RANGE_SHIFT) as u8,
            expected: (v >> EXPECTED_SHIFT) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_round_trips() {
        for step in Step::ALL {
            let ud = UserData::new(7, step).range(3).expected(4096);
            assert_eq!(UserData::decode(ud.encode()), Some(ud));
        }
    }

    #[test]
    fn extreme_values_round_trip_without_bleeding_into_each_other() {
        for (head, range, expected) in [(0, 0, 0), (u16::MAX, u8::MAX, u32::MAX), (1, 0, 1)] {
            for step in Step::ALL {
                let ud = UserData::new(head, step).range(range).expected(expected);
                let back = UserData::decode(ud.encode()).unwrap();
                assert_eq!(back, ud, "{head} {step:?} {range} {expected}");
            }
        }
    }

    #[test]
    fn the_layout_is_the_one_in_flight_sqes_carry() {
        // The documented layout: what a trace of CQEs shows.
        let ud = UserData::new(0x1234, Step::Discard)
            .range(0x56)
            .expected(0x789a_bcde);
        assert_eq!(ud.encode(), 0x789a_bcde_5604_1234);
    }

    #[test]
    fn an_unknown_step_does_not_decode() {
        assert_eq!(UserData::decode(7 << STEP_SHIFT), None);
        assert_eq!(UserData::decode(0xff << STEP_SHIFT), None);
        assert!(UserData::decode(6 << STEP_SHIFT).is_some());
    }
}
