//! The other ways to authenticate, beside an API key:
//!
//! - **Signed requests** (the native API): a key's signing secret is derived from the server's
//!   secret and the key's id (HMAC-SHA256), so it is stored nowhere; it is shown once, with the
//!   key. A request carries `X-Soulbox-Key-Id`, `X-Soulbox-Timestamp` (Unix seconds) and
//!   `X-Soulbox-Signature`: hex HMAC-SHA256 with that secret of `METHOD\npath?query\ntimestamp\n`
//!   and the hex SHA-256 of the body. The timestamp must be within [`SIGNATURE_SKEW`] of the
//!   server's clock, and a signature is accepted once.
//! - **Session tokens**: short-lived JWTs (HS256 with the server's secret) that
//!   `POST /v1/tokens` issues to a key, for browsers and terminals; a revoked key's tokens stop
//!   working with it.
//! - **Terminal tokens**: JWTs like session tokens, for one sandbox's web terminal only
//!   (audience `soulbox-terminal`, the sandbox in `sandbox`), so a browser holds no key; a
//!   session token is not a terminal token, and a terminal token opens nothing else.
//! - **OpenID Connect**: JWTs of an external issuer, checked against its JWKS (fetched at
//!   start), with the team and role in the `soulbox_team` and `soulbox_role` claims.
//!
//! The server's secret is 32 random bytes in `<data dir>/server-secret` (mode 0600), made at
//! the first start.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::{Keys, Principal, Role, hex};

/// How far a signed request's timestamp may be from the server's clock.
pub const SIGNATURE_SKEW: Duration = Duration::from_secs(300);

/// The longest life of a session token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The issuer of the server's own tokens.
const ISSUER: &str = "soulbox";

/// The most signatures remembered (a flood of valid signed requests cannot exhaust memory:
/// past it, the oldest are dropped — they are outside the skew window by then or soon).
const MAX_REMEMBERED_SIGNATURES: usize = 100_000;

/// Why a token or signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The signature, token or its claims are wrong, expired or replayed.
    #[error("{0}")]
    Refused(String),
    /// The key behind it is unknown or revoked.
    #[error("the key behind this token or signature is not valid")]
    KeyInvalid,
    /// The server's secret could not be made or read.
    #[error("the server's secret at {path}: {message}")]
    Secret {
        /// Where it is kept.
        path: String,
        /// What failed.
        message: String,
    },
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_hex(secret: &[u8], message: &[u8]) -> String {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(message);
    hex(&mac.finalize().into_bytes())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The claims of the server's own tokens: session tokens, and terminal tokens (which add an
/// audience and their sandbox).
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    sub: String,
    team: String,
    role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
    iat: u64,
    exp: u64,
}

/// The audience of terminal tokens (session tokens carry none).
const TERMINAL_AUDIENCE: &str = "soulbox-terminal";

/// The claims SoulBox reads from an OpenID Connect issuer's token.
#[derive(Debug, Deserialize)]
struct OidcClaims {
    soulbox_team: String,
    soulbox_role: Role,
    sub: String,
}

/// An external OpenID Connect issuer whose tokens are accepted.
#[derive(Debug, Clone)]
pub struct OidcIssuer {
    /// Its `iss`.
    pub issuer: String,
    /// The `aud` its tokens must carry.
    pub audience: String,
    /// Its signing keys.
    pub jwks: JwkSet,
}

/// The server's secret and what is built on it.
pub struct Tokens {
    secret: Vec<u8>,
    oidc: Option<OidcIssuer>,
    /// Signatures seen, with when they stop mattering (Unix seconds).
    seen: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("oidc", &self.oidc.as_ref().map(|o| &o.issuer))
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// The server's secret in `data_dir` (made at the first start), and an OIDC issuer.
    pub fn open(data_dir: &Path, oidc: Option<OidcIssuer>) -> Result<Self, TokenError> {
        let path = data_dir.join("server-secret");
        let failed = |e: std::io::Error| TokenError::Secret {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let secret = match std::fs::read(&path) {
            Ok(secret) if secret.len() >= 32 => secret,
            Ok(_) => {
                return Err(TokenError::Secret {
                    path: path.display().to_string(),
                    message: "shorter than 32 bytes; remove it to make a new one".to_owned(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = Vec::with_capacity(32);
                secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
                secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(failed)?;
                file.write_all(&secret).map_err(failed)?;
                file.sync_all().map_err(failed)?;
                secret
            }
            Err(e) => return Err(failed(e)),
        };
        Ok(Self { secret, oidc, seen: Mutex::default() })
    }

    /// The same, accepting the tokens of `oidc` too.
    pub fn with_oidc(self, oidc: OidcIssuer) -> Self {
        Self { oidc: Some(oidc), ..self }
    }

    /// The signing secret of key `key_id` (hex).
    pub fn signing_secret(&self, key_id: &str) -> String {
        hmac_hex(&self.secret, format!("signing:{key_id}").as_bytes())
    }

    /// Checks a signed request; who signed it.
    #[allow(clippy::too_many_arguments, reason = "the parts of a signed request")]
    pub fn verify_signed(
        &self,
        keys: &Keys,
        key_id: &str,
        timestamp: &str,
        signature: &str,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Principal, TokenError> {
        let refused = |why: &str| TokenError::Refused(format!("the request signature {why}"));
        let at: u64 = timestamp.parse().map_err(|_| refused("has no valid timestamp"))?;
        let now = now_secs();
        if now.abs_diff(at) > SIGNATURE_SKEW.as_secs() {
            return Err(refused("is too old or from the future (check the clock)"));
        }
        let message =
            format!("{method}\n{path_and_query}\n{timestamp}\n{}", hex(&Sha256::digest(body)));
        let expected = hmac_hex(self.signing_secret(key_id).as_bytes(), message.as_bytes());
        if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
            return Err(refused("does not match"));
        }
        let principal = keys.principal(key_id).ok_or(TokenError::KeyInvalid)?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|_, until| *until > now);
        if seen.len() >= MAX_REMEMBERED_SIGNATURES {
            return Err(refused("cannot be checked for replay now; retry shortly"));
        }
        if seen.insert(signature.to_owned(), at + SIGNATURE_SKEW.as_secs()).is_some() {
            return Err(refused("was used already (a replay)"));
        }
        Ok(principal)
    }

    /// A session token for `principal`, living `ttl` (at most [`MAX_TOKEN_TTL`]).
    pub fn issue(&self, principal: &Principal, ttl: Duration) -> Result<(String, u64), TokenError> {
        self.sign(principal, None, ttl)
    }

    /// A token for `principal` (a terminal token when `sandbox_id` is given), living `ttl`
    /// (at most [`MAX_TOKEN_TTL`]); with its expiry (Unix seconds).
    fn sign(
        &self,
        principal: &Principal,
        sandbox_id: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, u64), TokenError> {
        let iat = now_secs();
        let exp = iat + ttl.min(MAX_TOKEN_TTL).as_secs();
        let claims = Claims {
            iss: ISSUER.to_owned(),
            aud: sandbox_id.map(|_| TERMINAL_AUDIENCE.to_owned()),
            sub: principal.key_id.clone(),
            team: principal.team.clone(),
            role: principal.role,
            sandbox: sandbox_id.map(str::to_owned),
            iat,
            exp,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .map_err(|e| TokenError::Refused(e.to_string()))?;
        Ok((token, exp))
    }

    /// A terminal token for `principal` and sandbox `sandbox_id`, living `ttl` (at most
    /// [`MAX_TOKEN_TTL`]); with its expiry (Unix seconds).
    pub fn issue_terminal(
        &self,
        principal: &Principal,
        sandbox_id: &str,
        ttl: Duration,
    ) -> Result<(String, u64), TokenError> {
        self.sign(principal, Some(sandbox_id), ttl)
    }

    /// Checks a terminal token for sandbox `sandbox_id`: who it was issued to. The key behind
    /// it must still be valid (an OpenID Connect subject has no key to revoke).
    pub fn verify_terminal(
        &self,
        keys: &Keys,
        token: &str,
        sandbox_id: &str,
    ) -> Result<Principal, TokenError> {
        let claims = self.decode(token, Some(TERMINAL_AUDIENCE), "terminal")?;
        if claims.sandbox.as_deref() != Some(sandbox_id) {
            return Err(TokenError::Refused(format!(
                "the terminal token is for sandbox {}, not {sandbox_id}",
                claims.sandbox.unwrap_or_default()
            )));
        }
        if claims.sub.starts_with("oidc:") {
            return Ok(Principal { key_id: claims.sub, team: claims.team, role: claims.role });
        }
        key_holder(keys, &claims)
    }

    /// The claims of one of the server's own tokens, checked: its signature, issuer and
    /// expiry, and `audience` (a session token has none, and one with an audience is refused
    /// as a session token).
    fn decode(
        &self,
        token: &str,
        audience: Option<&str>,
        kind: &str,
    ) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
            }
            None => validation.set_required_spec_claims(&["exp", "iss", "sub"]),
        }
        validation.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&self.secret), &validation)
            .map(|data| data.claims)
            .map_err(|e| TokenError::Refused(format!("the {kind} token is not valid: {e}")))
    }

    /// Checks a bearer JWT: one of the server's session tokens, or one of the OIDC issuer's.
    pub fn verify_jwt(&self, keys: &Keys, token: &str) -> Result<Principal, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Refused(format!("the token is malformed: {e}")))?;
        if header.alg == Algorithm::HS256 {
            // The key must still be valid: revoking it ends its sessions.
            return key_holder(keys, &self.decode(token, None, "session")?);
        }
        let oidc = self.oidc.as_ref().ok_or_else(|| {
            TokenError::Refused("no OpenID Connect issuer is configured".to_owned())
        })?;
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Refused("the token names no key (kid)".to_owned()))?;
        let jwk = oidc
            .jwks
            .find(&kid)
            .ok_or_else(|| TokenError::Refused(format!("the issuer has no key {kid}")))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Refused(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&oidc.issuer]);
        validation.set_audience(&[&oidc.audience]);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<OidcClaims>(token, &key, &validation)
            .map_err(|e| TokenError::Refused(format!("the issuer's token is not valid: {e}")))?;
        Ok(Principal {
            key_id: format!("oidc:{}", data.claims.sub),
            team: data.claims.soulbox_team,
            role: data.claims.soulbox_role,
        })
    }
}

/// The holder of the key that the claims name, if that key is still valid, with at most the
/// claims' role.
fn key_holder(keys: &Keys, claims: &Claims) -> Result<Principal, TokenError> {
    let principal = keys.principal(&claims.sub).ok_or(TokenError::KeyInvalid)?;
    Ok(Principal { role: principal.role.min(claims.role), ..principal })
}

/// Fetches an OpenID Connect issuer's JWKS from `jwks_url`.
pub async fn fetch_jwks(jwks_url: &str) -> anyhow::Result<JwkSet> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let uri: hyper::Uri = jwks_url.parse()?;
    let response = client.get(uri).await?;
    anyhow::ensure!(response.status().is_success(), "{jwks_url} answered {}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}
