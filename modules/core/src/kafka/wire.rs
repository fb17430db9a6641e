//! Kafka's protocol, spoken natively for the few questions hapair asks of
//! a broker on every run: whether a pair listener lets a login in
//! (SaslHandshake and SaslAuthenticate, with a SCRAM-SHA-512 exchange of
//! RFC 5802 in them) and each partition's end offset (Metadata and
//! ListOffsets). Kafka's own tools answer the same, but each starts a JVM:
//! seconds of CPU, where this takes milliseconds, on every re-run of steps
//! 4 and 10, while step 10 waits for MirrorMaker's first heartbeat, and on
//! every measure of the monitor.
//!
//! The pair's Kafka is one broker a host: the broker asked leads every
//! partition, so each question is one connection to it.
//!
//! The server's last SCRAM message is checked too: a listener that let
//! anyone in could not sign it without the credential.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha512};

use super::{Login, PartitionOffsets, MECHANISM};

// The requests' API keys.
const LIST_OFFSETS: i16 = 2;
const METADATA: i16 = 3;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
const ALTER_USER_SCRAM_CREDENTIALS: i16 = 51;

/// AlterUserScramCredentials' number for SCRAM-SHA-512.
const SCRAM_SHA_512: u8 = 2;
/// SASL_AUTHENTICATION_FAILED: the credential was refused.
const AUTHENTICATION_FAILED: i16 = 58;
const CLIENT_ID: &str = "hapair";
const TIMEOUT: Duration = Duration::from_secs(10);
/// A larger answer is refused: the metadata of a pair's broker, with tens
/// of thousands of partitions, is a few MiB.
const MAX_RESPONSE: usize = 16 << 20;

/// Logs in to the listener at `address` as `login`: true when it lets the
/// login in (and proves it knows the credential), false when it refuses
/// it, an error when it does not answer as a Kafka SASL listener.
pub fn logs_in(address: SocketAddr, login: &Login) -> Result<bool> {
    Connection::open(address)?.log_in(address, login)
}

/// The end offset of every partition of `topic` (of every topic when
/// None) at the broker at `address`, logged in with `login` when given. A
/// topic the broker does not have has no partitions.
pub fn partition_end_offsets(
    address: SocketAddr,
    login: Option<&Login>,
    topic: Option<&str>,
) -> Result<PartitionOffsets> {
    let mut connection = Connection::open(address)?;
    if let Some(login) = login {
        if !connection.log_in(address, login)? {
            bail!("Kafka at {address} refused the pair's login");
        }
    }
    // Metadata v1: a null topic array asks for every topic.
    let mut body = Vec::new();
    match topic {
        Some(topic) => {
            body.extend(1i32.to_be_bytes());
            put_string(&mut body, topic);
        }
        None => body.extend((-1i32).to_be_bytes()),
    }
    let partitions = parse_metadata(&connection.call(METADATA, 1, &body)?)?;
    let mut offsets = PartitionOffsets::new();
    if partitions.is_empty() {
        return Ok(offsets);
    }
    // ListOffsets v1: the latest offset (timestamp -1) of each partition.
    let mut body = Vec::new();
    body.extend((-1i32).to_be_bytes()); // replica_id: a client
    body.extend(i32::try_from(partitions.len())?.to_be_bytes());
    for (topic, numbers) in &partitions {
        put_string(&mut body, topic);
        body.extend(i32::try_from(numbers.len())?.to_be_bytes());
        for number in numbers {
            body.extend(number.to_be_bytes());
            body.extend((-1i64).to_be_bytes());
        }
    }
    let answer = connection.call(LIST_OFFSETS, 1, &body)?;
    let mut reader = Reader(&answer);
    for _ in 0..reader.count()? {
        let topic = reader.string()?;
        for _ in 0..reader.count()? {
            let partition = reader.i32()?;
            let error = reader.i16()?;
            let _timestamp = reader.i64()?;
            let offset = reader.i64()?;
            if error != 0 {
                bail!(
                    "Kafka at {address} gave no end offset for {topic}:{partition} (error {error})"
                );
            }
            offsets.insert(
                (topic.clone(), u32::try_from(partition)?),
                u64::try_from(offset).unwrap_or(0),
            );
        }
    }
    Ok(offsets)
}

/// Sets `login`'s SCRAM-SHA-512 credential (`iterations`, a new random
/// salt) at the broker at `address`, its loopback listener:
/// AlterUserScramCredentials v0, with the salted password computed here,
/// as kafka-configs.sh does before it sends the same request. The password
/// itself never leaves this process.
pub fn set_credential(address: SocketAddr, login: &Login, iterations: u32) -> Result<()> {
    let mut connection = Connection::open(address)?;
    let salt = random_bytes::<32>()?;
    let salted = salted_password(login, &salt, iterations);
    let mut body = Vec::new();
    put_varint(&mut body, 1); // deletions: none
    put_varint(&mut body, 2); // upsertions: one
    put_compact_bytes(&mut body, login.user.as_bytes());
    body.push(SCRAM_SHA_512);
    body.extend(i32::try_from(iterations)?.to_be_bytes());
    put_compact_bytes(&mut body, &salt);
    put_compact_bytes(&mut body, &salted);
    body.push(0); // the upsertion's tagged fields
    body.push(0); // the request's
    let answer = connection.call_flexible(ALTER_USER_SCRAM_CREDENTIALS, 0, &body)?;
    let mut reader = Reader(&answer);
    reader.i32()?; // throttle_time_ms
    for _ in 0..reader.compact_count()? {
        let user = reader.compact_string()?;
        let error = reader.i16()?;
        let message = reader.compact_nullable_string()?;
        reader.skip_tagged_fields()?;
        if error != 0 {
            bail!(
                "Kafka at {address} did not set {user}'s credential (error {error}): {}",
                message.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A Metadata v1 answer's partitions, by topic; a topic it reports an
/// error for (one it does not have) is left out.
fn parse_metadata(answer: &[u8]) -> Result<BTreeMap<String, Vec<i32>>> {
    let mut reader = Reader(answer);
    for _ in 0..reader.count()? {
        reader.i32()?; // node_id
        reader.string()?; // host
        reader.i32()?; // port
        reader.nullable_string()?; // rack
    }
    reader.i32()?; // controller_id
    let mut topics = BTreeMap::new();
    for _ in 0..reader.count()? {
        let error = reader.i16()?;
        let name = reader.string()?;
        reader.take(1)?; // is_internal
        let mut numbers = Vec::new();
        for _ in 0..reader.count()? {
            reader.i16()?; // error_code
            numbers.push(reader.i32()?);
            reader.i32()?; // leader_id
            for _ in 0..2 {
                // replica_nodes, isr_nodes
                let nodes = reader.count()?;
                reader.take(nodes * 4)?;
            }
        }
        if error == 0 {
            topics.insert(name, numbers);
        }
    }
    Ok(topics)
}

/// The client's side of one SCRAM-SHA-512 exchange, from the server's
/// first message.
struct Exchange {
    client_final: String,
    server_signature: String,
}

impl Exchange {
    fn new(login: &Login, nonce: &str, first_bare: &str, server_first: &str) -> Result<Exchange> {
        let field = |name: &str| {
            server_first
                .split(',')
                .find_map(|part| part.strip_prefix(name))
                .with_context(|| format!("SCRAM server-first lacks {name}"))
        };
        let server_nonce = field("r=")?;
        if !server_nonce.starts_with(nonce) || server_nonce.len() == nonce.len() {
            bail!("SCRAM server-first has a nonce that is not the client's extended");
        }
        let salt = BASE64.decode(field("s=")?).context("SCRAM salt")?;
        let iterations: u32 = field("i=")?.parse().context("SCRAM iterations")?;
        if !(4096..=1_000_000).contains(&iterations) {
            bail!("SCRAM server-first asks {iterations} iterations");
        }
        let salted = salted_password(login, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key")?;
        let stored_key = Sha512::digest(&client_key);
        let without_proof = format!("c=biws,r={server_nonce}");
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored_key, auth_message.as_bytes())?;
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key")?;
        Ok(Exchange {
            client_final: format!("{without_proof},p={}", BASE64.encode(proof)),
            server_signature: BASE64.encode(hmac(&server_key, auth_message.as_bytes())?),
        })
    }
}

/// SCRAM's SaltedPassword: Hi(password, salt, i), PBKDF2 with HMAC-SHA512.
fn salted_password(login: &Login, salt: &[u8], iterations: u32) -> [u8; 64] {
    let mut salted = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(
        login.password.expose().as_bytes(),
        salt,
        iterations,
        &mut salted,
    );
    salted
}

fn hmac(key: &[u8], text: &[u8]) -> Result<Vec<u8>> {
    let mut mac = Hmac::<Sha512>::new_from_slice(key).context("HMAC key")?;
    mac.update(text);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// 24 random bytes, printable (base64 has no `,`).
fn client_nonce() -> Result<String> {
    Ok(BASE64.encode(random_bytes::<24>()?))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("can't read /dev/urandom")?;
    Ok(bytes)
}

struct Connection {
    stream: TcpStream,
    correlation: i32,
}

impl Connection {
    fn open(address: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&address, TIMEOUT)
            .with_context(|| format!("can't connect to Kafka at {address}"))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        Ok(Connection {
            stream,
            correlation: 0,
        })
    }

    /// SCRAM-SHA-512 on this connection: whether the broker let `login` in.
    fn log_in(&mut self, address: SocketAddr, login: &Login) -> Result<bool> {
        let mut body = Vec::new();
        put_string(&mut body, MECHANISM);
        let answer = self.call(SASL_HANDSHAKE, 1, &body)?;
        let mut reader = Reader(&answer);
        let error = reader.i16()?;
        if error != 0 {
            bail!("Kafka at {address} does not offer {MECHANISM} (error {error})");
        }

        let nonce = client_nonce()?;
        let first_bare = format!("n={},r={nonce}", login.user);
        let Some(server_first) = self.authenticate(format!("n,,{first_bare}").as_bytes())? else {
            return Ok(false);
        };
        let server_first = String::from_utf8(server_first).context("SCRAM server-first")?;
        let exchange = Exchange::new(login, &nonce, &first_bare, &server_first)?;
        let Some(server_final) = self.authenticate(exchange.client_final.as_bytes())? else {
            return Ok(false);
        };
        let server_final = String::from_utf8(server_final).context("SCRAM server-final")?;
        if server_final.strip_prefix("v=") != Some(&exchange.server_signature) {
            bail!("Kafka at {address} let the login in without proving it knows the credential");
        }
        Ok(true)
    }

    /// One request (header v1: not a flexible version) and its answer's
    /// body, after the correlation id (response header v0).
    fn call(&mut self, api_key: i16, api_version: i16, body: &[u8]) -> Result<Vec<u8>> {
        self.exchange(api_key, api_version, false, body)
    }

    /// A request of a flexible version (header v2, response header v1:
    /// each with tagged fields, none sent, those received skipped).
    fn call_flexible(&mut self, api_key: i16, api_version: i16, body: &[u8]) -> Result<Vec<u8>> {
        self.exchange(api_key, api_version, true, body)
    }

    fn exchange(
        &mut self,
        api_key: i16,
        api_version: i16,
        flexible: bool,
        body: &[u8],
    ) -> Result<Vec<u8>> {
        self.correlation += 1;
        let mut request = Vec::new();
        request.extend(api_key.to_be_bytes());
        request.extend(api_version.to_be_bytes());
        request.extend(self.correlation.to_be_bytes());
        put_string(&mut request, CLIENT_ID);
        if flexible {
            request.push(0); // no tagged fields
        }
        request.extend(body);
        let size = i32::try_from(request.len()).context("request size")?;
        self.stream.write_all(&size.to_be_bytes())?;
        self.stream.write_all(&request)?;

        let mut size = [0u8; 4];
        self.stream
            .read_exact(&mut size)
            .context("Kafka closed the connection")?;
        let size = usize::try_from(i32::from_be_bytes(size)).unwrap_or(usize::MAX);
        if !(4..=MAX_RESPONSE).contains(&size) {
            bail!("Kafka answered a frame of {size} bytes");
        }
        let mut answer = vec![0u8; size];
        self.stream.read_exact(&mut answer)?;
        let mut reader = Reader(&answer);
        if reader.i32()? != self.correlation {
            bail!("Kafka answered another request");
        }
        if flexible {
            reader.skip_tagged_fields()?;
        }
        Ok(reader.0.to_vec())
    }

    /// SaslAuthenticate v1 with `bytes`: the server's bytes, or None when
    /// it refused the credential.
    fn authenticate(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut body = Vec::new();
        body.extend(i32::try_from(bytes.len())?.to_be_bytes());
        body.extend(bytes);
        let answer = self.call(SASL_AUTHENTICATE, 1, &body)?;
        let mut reader = Reader(&answer);
        let error = reader.i16()?;
        let message = reader.nullable_string()?;
        match error {
            0 => Ok(Some(reader.bytes()?.to_vec())),
            AUTHENTICATION_FAILED => Ok(None),
            _ => bail!(
                "Kafka refused the SASL exchange (error {error}): {}",
                message.unwrap_or_default()
            ),
        }
    }
}

/// An unsigned varint, as flexible versions write lengths.
fn put_varint(out: &mut Vec<u8>, mut value: u32) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Compact bytes (and strings): the length plus one, as a varint.
fn put_compact_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u32 + 1);
    out.extend(bytes);
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.extend((text.len() as i16).to_be_bytes());
    out.extend(text.as_bytes());
}

/// Reads Kafka's big-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("Kafka's answer is cut short");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.take(8)?.try_into()?))
    }

    /// An array's length: never null here, and never more entries than
    /// bytes left.
    fn count(&mut self) -> Result<usize> {
        let count = usize::try_from(self.i32()?).context("Kafka sent a null array")?;
        if count > self.0.len() {
            bail!("Kafka's answer is cut short");
        }
        Ok(count)
    }

    fn varint(&mut self) -> Result<u32> {
        let mut value = 0u32;
        for shift in (0..35).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("Kafka sent a varint of more than five bytes")
    }

    /// A compact array's length (the varint less one); null is refused.
    fn compact_count(&mut self) -> Result<usize> {
        let count = (self.varint()? as usize)
            .checked_sub(1)
            .context("Kafka sent a null array")?;
        if count > self.0.len() {
            bail!("Kafka's answer is cut short");
        }
        Ok(count)
    }

    fn compact_string(&mut self) -> Result<String> {
        self.compact_nullable_string()?
            .context("Kafka sent a null string")
    }

    fn compact_nullable_string(&mut self) -> Result<Option<String>> {
        let Some(len) = (self.varint()? as usize).checked_sub(1) else {
            return Ok(None);
        };
        Ok(Some(String::from_utf8_lossy(self.take(len)?).into_owned()))
    }

    fn skip_tagged_fields(&mut self) -> Result<()> {
        for _ in 0..self.varint()? {
            self.varint()?; // tag
            let size = self.varint()? as usize;
            self.take(size)?;
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        self.nullable_string()?.context("Kafka sent a null string")
    }

    fn nullable_string(&mut self) -> Result<Option<String>> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(self.take(len as usize)?).into_owned(),
        ))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.i32()?;
        self.take(usize::try_from(len).context("Kafka sent bytes of a negative length")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    /// RFC 7677's SCRAM-SHA-256 example has no SHA-512 twin; this checks
    /// the exchange against the server's side computed independently from
    /// the same salted password (what Kafka stores: StoredKey, ServerKey).
    #[test]
    fn the_proof_verifies_against_the_stored_key_and_the_signature_matches() {
        let login = Login::new("hapair", &Secret::new("pencil-0123456789")).unwrap();
        let salt = b"0123456789abcdef";
        let server_first = format!(
            "r=fyko+d2lbbFgONRv9qkxdawLservernonce,s={},i=4096",
            BASE64.encode(salt)
        );
        let first_bare = "n=hapair,r=fyko+d2lbbFgONRv9qkxdawL";
        let exchange = Exchange::new(
            &login,
            "fyko+d2lbbFgONRv9qkxdawL",
            first_bare,
            &server_first,
        )
        .unwrap();

        let mut salted = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(b"pencil-0123456789", salt, 4096, &mut salted);
        let stored_key = Sha512::digest(hmac(&salted, b"Client Key").unwrap());
        let (without_proof, proof) = exchange.client_final.rsplit_once(",p=").unwrap();
        let auth_message = format!("{first_bare},{server_first},{without_proof}");
        let signature = hmac(&stored_key, auth_message.as_bytes()).unwrap();
        let client_key: Vec<u8> = BASE64
            .decode(proof)
            .unwrap()
            .iter()
            .zip(&signature)
            .map(|(p, s)| p ^ s)
            .collect();
        assert_eq!(Sha512::digest(&client_key), stored_key);
        let server_key = hmac(&salted, b"Server Key").unwrap();
        assert_eq!(
            exchange.server_signature,
            BASE64.encode(hmac(&server_key, auth_message.as_bytes()).unwrap())
        );
    }

    #[test]
    fn a_server_nonce_that_does_not_extend_the_client_s_is_refused() {
        let login = Login::new("hapair", &Secret::new("pencil-0123456789")).unwrap();
        for server_first in [
            "r=other,s=c2FsdA==,i=4096",
            "r=abc,s=c2FsdA==,i=4096",
            "r=abcd,s=c2FsdA==,i=1",
        ] {
            assert!(
                Exchange::new(&login, "abc", "n=hapair,r=abc", server_first).is_err(),
                "{server_first}"
            );
        }
    }

    /// A Metadata v1 answer: one broker, topic `t` with partitions 0 and 1,
    /// and a topic the broker reports an error for.
    fn metadata_answer() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(1i32.to_be_bytes()); // brokers
        out.extend(1i32.to_be_bytes());
        put_string(&mut out, "127.0.0.1");
        out.extend(9092i32.to_be_bytes());
        out.extend((-1i16).to_be_bytes()); // rack: null
        out.extend(1i32.to_be_bytes()); // controller
        out.extend(2i32.to_be_bytes()); // topics
        out.extend(0i16.to_be_bytes());
        put_string(&mut out, "t");
        out.push(0);
        out.extend(2i32.to_be_bytes());
        for partition in [0i32, 1] {
            out.extend(0i16.to_be_bytes());
            out.extend(partition.to_be_bytes());
            out.extend(1i32.to_be_bytes()); // leader
            for _ in 0..2 {
                out.extend(1i32.to_be_bytes());
                out.extend(1i32.to_be_bytes());
            }
        }
        out.extend(3i16.to_be_bytes()); // UNKNOWN_TOPIC_OR_PARTITION
        put_string(&mut out, "gone");
        out.push(0);
        out.extend(0i32.to_be_bytes());
        out
    }

    #[test]
    fn metadata_gives_each_topic_s_partitions_and_leaves_out_errors() {
        let topics = parse_metadata(&metadata_answer()).unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!(topics["t"], vec![0, 1]);
    }

    #[test]
    fn every_cut_short_metadata_answer_is_an_error_not_a_panic() {
        let answer = metadata_answer();
        for len in 0..answer.len() {
            assert!(parse_metadata(&answer[..len]).is_err(), "{len}");
        }
        // An array that claims more entries than there are bytes.
        assert!(parse_metadata(&i32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn varints_and_compact_fields_read_back_as_written() {
        for value in [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(Reader(&out).varint().unwrap(), value);
        }
        let mut out = Vec::new();
        put_compact_bytes(&mut out, b"hapair");
        out.extend([1, 7, 2, 0xaa, 0xbb]); // one tagged field: tag 7, 2 bytes
        let mut reader = Reader(&out);
        assert_eq!(reader.compact_string().unwrap(), "hapair");
        reader.skip_tagged_fields().unwrap();
        assert!(reader.0.is_empty());
        // Null (0), and lengths past the end.
        assert!(Reader(&[0]).compact_count().is_err());
        assert!(Reader(&[0]).compact_string().is_err());
        assert_eq!(Reader(&[0]).compact_nullable_string().unwrap(), None);
        assert!(Reader(&[9, 1]).compact_string().is_err());
        assert!(Reader(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
            .varint()
            .is_err());
    }

    #[test]
    fn short_answers_are_errors_not_panics() {
        assert!(Reader(&[0]).i16().is_err());
        assert!(Reader(&[0, 0, 0, 9, 1]).bytes().is_err());
        assert!(Reader(&[0xff, 0xff, 0xff, 0xff]).bytes().is_err());
        assert_eq!(Reader(&[0xff, 0xff]).nullable_string().unwrap(), None);
    }
}
