//! The Connect protocol with JSON, as the E2B SDKs speak it (protocol.md, 3.2): unary calls
//! are a JSON body in and out; streams are 5-byte envelopes (`flags`, big-endian length,
//! JSON), ending with an end-of-stream envelope (`flags = 2`) that carries `{}` or an error.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

/// The content type of a stream; exactly this string (the SDK refuses parameters).
pub(crate) const STREAM_CONTENT_TYPE: &str = "application/connect+json";

/// The largest request body of a call (all its messages).
pub(crate) const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Envelope flag: the payload is compressed (never used: the SDK asks for identity).
const FLAG_COMPRESSED: u8 = 0b01;
/// Envelope flag: the end of the stream.
const FLAG_END_STREAM: u8 = 0b10;

/// A Connect error code (the 16 of the protocol that SoulBox uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    fn name(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Unauthenticated => "unauthenticated",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidArgument => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists => StatusCode::CONFLICT,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: a code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectError {
    pub(crate) code: Code,
    pub(crate) message: String,
}

impl ConnectError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    fn body(&self) -> serde_json::Value {
        json!({ "code": self.code.name(), "message": self.message })
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self.body())).into_response()
    }
}

/// A call's body. One that cannot be read (too large, cut short) is answered in the
/// protocol's shape: a Connect error, with 413 for a body over [`MAX_REQUEST_BYTES`].
#[derive(Debug)]
pub(crate) struct CallBody(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for CallBody {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Response> {
        let headers = request.headers().clone();
        Bytes::from_request(request, state).await.map(Self).map_err(|rejection| {
            let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
            let code = if too_large { Code::ResourceExhausted } else { Code::InvalidArgument };
            let message = format!(
                "{} (a call carries at most {} MiB)",
                rejection.body_text(),
                MAX_REQUEST_BYTES >> 20
            );
            let error = ConnectError::new(code, message);
            if is_stream(&headers) {
                stream_error(error)
            } else {
                (rejection.status(), Json(error.body())).into_response()
            }
        })
    }
}

/// Whether a request is a stream (else unary), by its content type.
fn is_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(STREAM_CONTENT_TYPE))
}

/// The messages of a request: the body of a unary call, or every envelope of a stream (the
/// SDK sends no end-of-stream envelope; one is accepted and ends the list).
pub(crate) fn request_messages<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<T>, ConnectError> {
    let invalid = |message: String| ConnectError::new(Code::InvalidArgument, message);
    let parse = |bytes: &[u8]| {
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("invalid request message: {e}")))
    };
    if !is_stream(headers) {
        let content_type =
            headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !content_type.is_empty() && !content_type.starts_with("application/json") {
            return Err(invalid(format!(
                "content type `{content_type}` is not supported; send application/json (unary \
                 calls) or {STREAM_CONTENT_TYPE} (streams)"
            )));
        }
        return Ok(vec![parse(body)?]);
    }
    let mut messages = Vec::new();
    let mut rest: &[u8] = body;
    while !rest.is_empty() {
        let [flags, a, b, c, d, ..] = *rest else {
            return Err(invalid("a truncated envelope header".to_owned()));
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        let payload = rest
            .get(5..5 + len)
            .ok_or_else(|| invalid(format!("an envelope of {len} bytes is truncated")))?;
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::new(
                Code::Unimplemented,
                "compressed messages are not supported; send identity",
            ));
        }
        if flags & FLAG_END_STREAM != 0 {
            break;
        }
        messages.push(parse(payload)?);
        rest = &rest[5 + len..];
    }
    Ok(messages)
}

/// The one message of a unary call or a server stream's request.
pub(crate) fn request_message<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ConnectError> {
    request_messages(headers, body)?
        .into_iter()
        .next()
        .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "the request carries no message"))
}

/// A unary answer.
pub(crate) fn unary<T: Serialize>(message: &T) -> Response {
    Json(message).into_response()
}

/// One envelope (also what the CLI sends as a streaming call's request).
pub(crate) fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(flags);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// The sending side of a server stream. Dropping it without [`StreamSender::end`] ends the
/// stream with an `internal` error, so a client never waits for an end that cannot come.
pub(crate) struct StreamSender {
    frames: mpsc::Sender<Result<Bytes, Infallible>>,
    ended: bool,
}

impl StreamSender {
    /// Sends a message; `false` when the client has gone.
    pub(crate) async fn send<T: Serialize>(&self, message: &T) -> bool {
        let payload = serde_json::to_vec(message).unwrap_or_default();
        self.frames.send(Ok(envelope(0, &payload))).await.is_ok()
    }

    /// Ends the stream: with success, or with `error`.
    pub(crate) async fn end(mut self, error: Option<ConnectError>) {
        self.ended = true;
        let trailer = match error {
            None => json!({}),
            Some(error) => json!({ "error": error.body() }),
        };
        let payload = serde_json::to_vec(&trailer).unwrap_or_default();
        let _ = self.frames.send(Ok(envelope(FLAG_END_STREAM, &payload))).await;
    }

    /// Completes when the client has gone.
    pub(crate) async fn closed(&self) {
        self.frames.closed().await;
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if !self.ended {
            let error =
                json!({ "error": { "code": "internal", "message": "the stream ended early" } });
            let payload = serde_json::to_vec(&error).unwrap_or_default();
            let _ = self.frames.try_send(Ok(envelope(FLAG_END_STREAM, &payload)));
        }
    }
}

/// A server stream: its sender, and the response that carries what is sent.
pub(crate) fn server_stream() -> (StreamSender, Response) {
    let (frames, receiver) = mpsc::channel(16);
    let body = Body::from_stream(receiver_stream(receiver));
    let response = ([(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)], body).into_response();
    (StreamSender { frames, ended: false }, response)
}

fn receiver_stream(
    receiver: mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// A server stream that is only an error (a request refused before it started).
pub(crate) fn stream_error(error: ConnectError) -> Response {
    let payload = serde_json::to_vec(&json!({ "error": error.body() })).unwrap_or_default();
    ([(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)], envelope(FLAG_END_STREAM, &payload))
        .into_response()
}

/// A stream answer with one empty message and a successful end (client streams).
pub(crate) fn client_stream_done() -> Response {
    let mut body = envelope(0, b"{}").to_vec();
    body.extend_from_slice(&envelope(FLAG_END_STREAM, b"{}"));
    ([(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)], body).into_response()
}

/// Answers `error` in the form the request expects: an end-of-stream envelope for a stream,
/// a JSON error with its status for a unary call.
pub(crate) fn error_for(headers: &HeaderMap, error: ConnectError) -> Response {
    if is_stream(headers) { stream_error(error) } else { error.into_response() }
}

/// The deadline of a call, from `connect-timeout-ms`.
pub(crate) fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let ms: u64 = headers.get("connect-timeout-ms")?.to_str().ok()?.parse().ok()?;
    (ms > 0).then(|| std::time::Duration::from_millis(ms))
}

/// The keepalive interval asked for with `keepalive-ping-interval` (seconds).
pub(crate) fn keepalive(headers: &HeaderMap) -> Option<std::time::Duration> {
    let seconds: u64 = headers.get("keepalive-ping-interval")?.to_str().ok()?.parse().ok()?;
    (seconds > 0).then(|| std::time::Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, STREAM_CONTENT_TYPE.parse().expect("a header"));
        headers
    }

    #[test]
    fn envelopes_parse_back_across_messages() {
        let mut body = envelope(0, br#"{"a":1}"#).to_vec();
        body.extend_from_slice(&envelope(0, br#"{"a":2}"#));
        let messages: Vec<serde_json::Value> =
            request_messages(&stream_headers(), &Bytes::from(body)).expect("two messages");
        assert_eq!(messages, vec![json!({"a": 1}), json!({"a": 2})]);
    }

    #[test]
    fn truncated_and_compressed_envelopes_are_refused() {
        let truncated = Bytes::from_static(&[0, 0, 0, 0, 9, b'{']);
        let error = request_messages::<serde_json::Value>(&stream_headers(), &truncated);
        assert_eq!(error.expect_err("truncated").code, Code::InvalidArgument);
        let compressed = envelope(FLAG_COMPRESSED, b"{}");
        let error = request_messages::<serde_json::Value>(&stream_headers(), &compressed);
        assert_eq!(error.expect_err("compressed").code, Code::Unimplemented);
    }

    #[test]
    fn an_empty_unary_body_is_the_empty_message() {
        let message: serde_json::Value =
            request_message(&HeaderMap::new(), &Bytes::new()).expect("a message");
        assert_eq!(message, json!({}));
    }
}
