//! `[diagnostics] echo`: every complete data message a client sends goes back to it unchanged, text as text and
//! binary as binary, so conformance suites that expect an echo server (Autobahn|Testsuite's fuzzing client) can
//! run against densepush.
//!
//! It owns reassembling a message from the decoder's streamed chunks and framing the answer. It does not
//! decode, validate (the frame decoder has already checked UTF-8 and `max_inbound_message_bytes`, RFC 6455
//! §8.1 and §10.4) or write anything: the reactor sends the frames it returns. When echo is off the reactor
//! never builds an [`Echo`], so it costs one branch per read; when on, a message that straddles reads waits in
//! the connection's spill (`Spill::echo`) and the buffer is freed once the message is complete.

use super::spill::Spill;
use crate::proto::frame;
use bytes::Bytes;

/// Echo state for one pass of the decoder over one read.
#[derive(Debug, Default)]
pub struct Echo {
    /// The message assembled so far (fragments of a message not yet finished).
    partial: Vec<u8>,
    /// Frames to send back, in the order the messages completed.
    frames: Vec<Bytes>,
}

impl Echo {
    /// Picks up a message left unfinished by the previous read, if any.
    pub fn resume(spill: Option<&mut Spill>) -> Echo {
        Echo {
            partial: spill
                .map(|s| std::mem::take(&mut s.echo))
                .unwrap_or_default(),
            frames: Vec::new(),
        }
    }

    /// Takes one decoded data chunk (RFC 6455 §5.4: fragments of one message arrive in order, uninterleaved
    /// with other data messages).
    pub fn chunk(&mut self, text: bool, chunk: &[u8], last: bool) {
        if !last {
            self.partial.extend_from_slice(chunk);
            return;
        }
        if self.partial.is_empty() {
            // An unfragmented message (the usual case) is framed straight from the read buffer.
            self.frames.push(frame::encode_message(text, chunk));
        } else {
            self.partial.extend_from_slice(chunk);
            self.frames.push(frame::encode_message(text, &self.partial));
            self.partial = Vec::new();
        }
    }

    /// The frames to send back now, and the unfinished message (empty if none) that must wait in the
    /// connection's spill until the next read.
    pub fn suspend(self) -> (Vec<Bytes>, Vec<u8>) {
        (self.frames, self.partial)
    }

    /// Frames completed so far (for tests).
    #[cfg(test)]
    fn frames(&self) -> &[Bytes] {
        &self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_text_message_is_echoed_as_one_text_frame() {
        let mut echo = Echo::default();
        echo.chunk(true, b"hello", true);
        assert_eq!(echo.frames(), &[frame::encode_message(true, b"hello")]);
    }

    #[test]
    fn binary_stays_binary() {
        let mut echo = Echo::default();
        echo.chunk(false, &[0, 1, 2], true);
        assert_eq!(echo.frames(), &[frame::encode_message(false, &[0, 1, 2])]);
    }

    #[test]
    fn fragments_are_joined_into_one_frame() {
        let mut echo = Echo::default();
        echo.chunk(true, b"he", false);
        echo.chunk(true, b"", false);
        echo.chunk(true, b"llo", true);
        assert_eq!(echo.frames(), &[frame::encode_message(true, b"hello")]);
        assert!(echo.partial.is_empty());
    }

    #[test]
    fn unfinished_message_survives_a_resume() {
        let mut spill = Spill::default();
        let mut echo = Echo::resume(Some(&mut spill));
        echo.chunk(false, b"ab", false);
        assert!(echo.frames().is_empty());
        spill.echo = echo.partial;
        let mut echo = Echo::resume(Some(&mut spill));
        assert!(spill.echo.is_empty());
        echo.chunk(false, b"cd", true);
        assert_eq!(echo.frames(), &[frame::encode_message(false, b"abcd")]);
    }

    #[test]
    fn empty_message_is_echoed_empty() {
        let mut echo = Echo::default();
        echo.chunk(true, b"", true);
        assert_eq!(echo.frames(), &[frame::encode_message(true, b"")]);
    }
}
