//! kubelet's plugin watcher dials the registration socket with gRPC and
//! sends the socket's path as the HTTP/2 `:authority` of its requests. The
//! HTTP/2 server under tonic refuses a path there as a malformed authority
//! (PROTOCOL_ERROR), so those connections pass through this relay: it
//! rewrites each header block the client sends with the authority
//! `localhost` and passes every other byte through unchanged.

use std::io;

use loona_hpack::Decoder;
use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The client connection preface every HTTP/2 connection starts with.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts, whatever it advertises.
const MAX_FRAME: usize = 16_384;
/// The authority requests get instead of a socket path.
const AUTHORITY: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not an HTTP/2 connection")]
    Preface,
    #[error("malformed HTTP/2 frame: {0}")]
    Frame(&'static str),
    #[error("undecodable header block: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
}

/// Relays `client` to `server` both ways until either side closes, with the
/// client's `:authority` made `localhost`.
pub async fn relay<C, S>(client: C, server: S) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let up = async {
        let result = rewrite(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
        result
    };
    let down = async {
        tokio::io::copy(&mut server_read, &mut client_write).await?;
        client_write.shutdown().await?;
        Ok::<_, RelayError>(())
    };
    tokio::try_join!(up, down).map(drop)
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    fragment: Vec<u8>,
}

/// Copies the client's side of an HTTP/2 connection from `from` to `to`,
/// re-encoding each header block.
async fn rewrite<R, W>(from: &mut R, to: &mut W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(RelayError::Preface);
    }
    to.write_all(&preface).await?;
    let mut decoder = Decoder::new();
    let mut block: Option<Block> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = [head[5], head[6], head[7], head[8]];
        let mut payload = vec![0u8; length];
        from.read_exact(&mut payload).await?;
        match (kind, &mut block) {
            (HEADERS, None) => {
                block = Some(Block {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    fragment: header_fragment(&payload, flags)?.to_vec(),
                });
            }
            (CONTINUATION, Some(pending)) if pending.stream == stream => {
                pending.fragment.extend_from_slice(&payload);
            }
            (HEADERS | CONTINUATION, _) => {
                return Err(RelayError::Frame("header block interleaved"));
            }
            (_, Some(_)) => return Err(RelayError::Frame("frame inside a header block")),
            (_, None) => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        }
        if flags & END_HEADERS != 0 {
            let done = block.take().expect("a block was just collected");
            let headers = decoder.decode(&done.fragment).map_err(RelayError::Hpack)?;
            let encoded = encode(&headers);
            to.write_all(&frames(&done, &encoded)).await?;
        }
    }
}

/// The header block fragment of a HEADERS frame: without its padding and
/// its priority fields.
fn header_fragment(payload: &[u8], flags: u8) -> Result<&[u8], RelayError> {
    let mut fragment = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment
            .split_first()
            .ok_or(RelayError::Frame("padded frame without its pad length"))?;
        fragment = rest
            .get(..rest.len().saturating_sub(usize::from(pad)))
            .filter(|_| usize::from(pad) <= rest.len())
            .ok_or(RelayError::Frame("padding longer than the frame"))?;
    }
    if flags & PRIORITY != 0 {
        fragment = fragment
            .get(5..)
            .ok_or(RelayError::Frame("priority fields cut short"))?;
    }
    Ok(fragment)
}

/// `headers` as an HPACK block of literals that are never indexed, so the
/// server's table stays empty and nothing depends on what it holds; the
/// authority is `localhost`.
fn encode(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        let value = if name == b":authority" {
            AUTHORITY
        } else {
            value.as_slice()
        };
        // Literal header field without indexing, new name.
        out.push(0x00);
        for text in [name.as_slice(), value] {
            // The length, not Huffman-coded; writing to a Vec cannot fail.
            let _ = encode_integer_into(text.len(), 7, 0x00, &mut out);
            out.extend_from_slice(text);
        }
    }
    out
}

/// The HEADERS frame, and CONTINUATION frames as needed, carrying `encoded`
/// for the stream of `block`.
fn frames(block: &Block, encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded.len() + 18);
    let chunks: Vec<&[u8]> = if encoded.is_empty() {
        vec![&[]]
    } else {
        encoded.chunks(MAX_FRAME).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let len = chunk.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
        let (kind, mut flags) = if i == 0 {
            (HEADERS, if block.end_stream { END_STREAM } else { 0 })
        } else {
            (CONTINUATION, 0)
        };
        if i == last {
            flags |= END_HEADERS;
        }
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&block.stream);
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Splits a byte stream into (type, flags, stream, payload) frames.
    fn parse(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            frames.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        frames
    }

    fn request(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/pluginregistration.Registration/GetInfo"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    #[tokio::test]
    async fn the_authority_becomes_localhost_and_all_else_passes_unchanged() {
        // A client's stream: the preface, SETTINGS, a request whose header
        // block (indexed by a real HPACK encoder, so the second one refers to
        // the first's table) is split over HEADERS, padded and with priority,
        // and CONTINUATION, its DATA, and a second request.
        let mut encoder = loona_hpack::Encoder::new();
        let path = "/var/lib/kubelet/plugins_registry/lvmlocal.io-reg.sock";
        let first = encoder.encode(request(path).iter().map(|(n, v)| (&n[..], &v[..])));
        let second = encoder.encode(request(path).iter().map(|(n, v)| (&n[..], &v[..])));
        assert!(
            second.len() < first.len(),
            "the second block uses the table"
        );
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let (a, b) = first.split_at(first.len() / 2);
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        for part in [
            settings.clone(),
            frame(HEADERS, PADDED | PRIORITY, 1, &padded),
            frame(CONTINUATION, END_HEADERS, 1, b),
            data.clone(),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        ] {
            input.extend_from_slice(&part);
        }

        let mut output = Vec::new();
        rewrite(&mut input.as_slice(), &mut output).await.unwrap();

        assert_eq!(&output[..24], PREFACE);
        let frames = parse(&output[24..]);
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert_eq!(
            frame(frames[0].0, frames[0].1, frames[0].2, &frames[0].3),
            settings
        );
        assert_eq!(
            frame(frames[2].0, frames[2].1, frames[2].2, &frames[2].3),
            data
        );
        let mut decoder = Decoder::new();
        for (i, stream, flags) in [(1, 1, END_HEADERS), (3, 3, END_HEADERS | END_STREAM)] {
            let (kind, got_flags, got_stream, block) = &frames[i];
            assert_eq!((*kind, *got_flags, *got_stream), (HEADERS, flags, stream));
            assert_eq!(decoder.decode(block).unwrap(), request("localhost"));
        }
    }

    #[tokio::test]
    async fn what_is_not_http2_is_refused() {
        let mut output = Vec::new();
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert!(matches!(
            rewrite(&mut input.as_slice(), &mut output).await,
            Err(RelayError::Preface)
        ));
        assert!(output.is_empty());
    }

    #[test]
    fn long_blocks_are_split_into_continuations() {
        let block = Block {
            stream: [0, 0, 0, 5],
            end_stream: true,
            fragment: Vec::new(),
        };
        let encoded = vec![7u8; MAX_FRAME + 10];
        let out = frames(&block, &encoded);
        let parsed = parse(&out);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            (parsed[0].0, parsed[0].1, parsed[0].3.len()),
            (HEADERS, END_STREAM, MAX_FRAME)
        );
        assert_eq!(
            (parsed[1].0, parsed[1].1, parsed[1].3.len()),
            (CONTINUATION, END_HEADERS, 10)
        );
    }
}
