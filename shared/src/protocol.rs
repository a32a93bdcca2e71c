//! Control messages on the daemon's local socket.
//!
//! A frame is a little-endian `u32` payload length followed by that many bytes
//! of JSON. Control messages are small and rare (one per batch of thousands of
//! rows); the rows themselves travel through shared memory (see [`crate::batch`]).
//!
//! A session is: `Hello` (versioned handshake), then any number of `Attach`
//! (map a shared-memory region), `Score`, `Distill` and `MeasureImportance`
//! requests, each answered in order.
//!
//! A region is an anonymous memory file (memfd) whose descriptor travels with
//! the `Attach` frame as SCM_RIGHTS ancillary data, attached to the frame's
//! first byte; it is never named in a file system, so no other local user can
//! squat, open or replace it.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::batch::BatchLayout;
use crate::error::WireError;
use crate::importance::Importance;
use crate::surrogate::Surrogate;

/// Bumped whenever a message changes shape.
/// 2: `Attach` carries the region as a file descriptor, no longer a path.
/// 3: a batch's output may ask for every class's probability.
/// 4: `Distill` asks for a version's rule surrogate.
/// 5: `MeasureImportance` asks for a version's permutation importance.
pub const PROTOCOL_VERSION: u32 = 5;

/// Upper bound on one control frame; anything larger is a broken peer.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        client: String,
    },
    /// Map the memory file whose descriptor came with this frame (exactly
    /// one, SCM_RIGHTS) as region `region`, `len` bytes long. The file must
    /// be sealed against shrinking (F_SEAL_SHRINK), so the daemon's mapping
    /// stays backed whatever the peer does.
    Attach {
        region: u32,
        len: u64,
    },
    Score(ScoreRequest),
    /// Fit a rule surrogate of `max_depth` levels to the version's own
    /// predictions on its training snapshot; answered with `Distilled`. The
    /// daemon stores nothing: the backend writes the surrogate in its own
    /// transaction, so a cancelled or rolled-back call leaves no trace.
    Distill(DistillRequest),
    /// Measure the version's permutation importance on its snapshot's
    /// validation rows, scoring as a scan does; answered with
    /// `Measured`. As with `Distill`, the backend stores it.
    MeasureImportance(MeasureRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeasureRequest {
    /// `cerebro.model_versions.id` of the version to measure.
    pub model_version_id: i64,
    /// The artifact the client expects; the daemon refuses to measure another.
    pub artifact_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillRequest {
    /// `cerebro.model_versions.id` of the version to distill.
    pub model_version_id: i64,
    /// The artifact the client expects; the daemon refuses to distill another.
    pub artifact_sha256: String,
    pub max_depth: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRequest {
    /// `cerebro.model_versions.id` of the model to score with.
    pub model_version_id: i64,
    /// The artifact the client expects; the daemon refuses to score with another.
    pub artifact_sha256: String,
    /// Which attached region holds the batch.
    pub region: u32,
    pub layout: BatchLayout,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        server: String,
    },
    Attached {
        region: u32,
    },
    Scored {
        region: u32,
        rows: u32,
    },
    Distilled {
        surrogate: Surrogate,
    },
    /// `importance` is None when its metric is not defined on the rows
    /// (one class only); `metrics` are an imported version's on all its
    /// validation rows, as training measures them (none for another).
    Measured {
        importance: Option<Importance>,
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
    },
    Error(WireError),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed by peer")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(std::io::Error),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            FrameError::Io(e)
        }
    }
}

/// Serialises `msg` into one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(msg).expect("protocol messages always serialise");
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// [`encode`], refusing a frame larger than [`MAX_FRAME_BYTES`]: the peer
/// would refuse it, and close the connection, anyway.
pub fn try_encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let frame = encode(msg);
    if frame.len() - 4 > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(frame.len() - 4));
    }
    Ok(frame)
}

/// Reads the payload length from a frame header, enforcing the size limit.
pub fn payload_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(payload)?)
}

/// A request frame's payload. Score frames, one per scored batch or row,
/// are read as a plain struct, in one pass; serde reads an internally
/// tagged enum by buffering the whole frame first, which cost more than
/// scoring one row. Every other frame (and a score frame the struct does
/// not fit, for its precise error) goes through [`Request`] itself, whose
/// `hello` every protocol version reads alike.
pub fn decode_request(payload: &[u8]) -> Result<Request, FrameError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum ScoreTag {
        Score,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ScoreFrame {
        #[serde(rename = "type")]
        _tag: ScoreTag,
        model_version_id: i64,
        artifact_sha256: String,
        region: u32,
        layout: BatchLayout,
    }
    if let Ok(f) = serde_json::from_slice::<ScoreFrame>(payload) {
        return Ok(Request::Score(ScoreRequest {
            model_version_id: f.model_version_id,
            artifact_sha256: f.artifact_sha256,
            region: f.region,
            layout: f.layout,
        }));
    }
    decode(payload)
}

/// Blocking write of one frame; one larger than the peer would read is
/// refused here rather than sent.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&try_encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let mut payload = vec![0u8; payload_len(header)?];
    r.read_exact(&mut payload)?;
    decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{plan_batch, ColumnData};
    use crate::error::ErrorCode;

    #[test]
    fn score_frames_read_in_one_pass_equal_the_enum_s_reading() {
        let (layout, _) = plan_batch(&[ColumnData::Float64(vec![Some(1.0)]), ColumnData::Text(vec![None])]);
        let score =
            Request::Score(ScoreRequest { model_version_id: 7, artifact_sha256: "ab".into(), region: 1, layout });
        let distill =
            Request::Distill(DistillRequest { model_version_id: 7, artifact_sha256: "ab".into(), max_depth: 4 });
        let measure = Request::MeasureImportance(MeasureRequest { model_version_id: 7, artifact_sha256: "ab".into() });
        for request in [
            score,
            distill,
            measure,
            Request::Hello { protocol: 2, client: "old".into() },
            Request::Attach { region: 0, len: 8 },
        ] {
            let frame = encode(&request);
            assert_eq!(decode_request(&frame[4..]).unwrap(), request);
            assert_eq!(decode::<Request>(&frame[4..]).unwrap(), request);
        }
        let unknown = br#"{"type": "score", "model_version_id": 7, "artifact_sha256": "ab", "region": 1, "extra": 1}"#;
        assert!(matches!(decode_request(unknown), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn frames_round_trip() {
        let (layout, _) = plan_batch(&[ColumnData::Float64(vec![Some(1.0), None])]);
        let msgs = vec![
            Request::Hello { protocol: PROTOCOL_VERSION, client: "test".into() },
            Request::Attach { region: 0, len: 4096 },
            Request::Score(ScoreRequest { model_version_id: 7, artifact_sha256: "ab".into(), region: 0, layout }),
            Request::Distill(DistillRequest { model_version_id: 7, artifact_sha256: "ab".into(), max_depth: 2 }),
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_frame(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &msgs {
            let back: Request = read_frame(&mut r).unwrap();
            assert_eq!(&back, m);
        }
        assert!(matches!(read_frame::<_, Request>(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_and_malformed_frames_are_rejected() {
        let header = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(payload_len(header), Err(FrameError::TooLarge(_))));

        let mut wire = Vec::new();
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(b"{x}");
        assert!(matches!(read_frame::<_, Response>(&mut &wire[..]), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn a_frame_too_large_for_the_peer_is_not_sent() {
        let hello = Request::Hello { protocol: PROTOCOL_VERSION, client: "x".repeat(MAX_FRAME_BYTES) };
        let mut wire = Vec::new();
        assert!(matches!(write_frame(&mut wire, &hello), Err(FrameError::TooLarge(_))));
        assert!(wire.is_empty());
        // A length prefix of 2^32 - 1 is refused before anything is allocated.
        assert!(matches!(read_frame::<_, Request>(&mut &[0xff; 8][..]), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn error_responses_carry_code_and_hint() {
        let resp = Response::Error(WireError::new(ErrorCode::ModelNotFound, "no model 3").with_hint("h"));
        let back: Response = read_frame(&mut &encode(&resp)[..]).unwrap();
        assert_eq!(back, resp);
    }
}
