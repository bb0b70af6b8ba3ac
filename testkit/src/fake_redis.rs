//! A "Redis" on 127.0.0.1 that fails every command but the set-up with a recognisable error.

/// A "Redis" on 127.0.0.1 that answers PING and the connection set-up like Redis, and every
/// other command with an error carrying `FakeRedis::MARKER`: internal text that must not reach
/// API clients.
#[derive(Debug)]
pub struct FakeRedis {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRedis {
    pub const MARKER: &str = "fake-redis-internal-detail 10.11.12.13:6379";

    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(fake_redis_connection(stream));
            }
        });
        Self { url, task }
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_redis_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        let mut replies = Vec::new();
        while let Some((command, used)) = parse_resp_command(&buffer) {
            buffer.drain(..used);
            let name = command
                .first()
                .map(|c| c.to_ascii_uppercase())
                .unwrap_or_default();
            match name.as_slice() {
                b"PING" => replies.extend_from_slice(b"+PONG\r\n"),
                b"CLIENT" | b"SELECT" => replies.extend_from_slice(b"+OK\r\n"),
                _ => {
                    replies.extend_from_slice(format!("-ERR {}\r\n", FakeRedis::MARKER).as_bytes())
                }
            }
        }
        if stream.write_all(&replies).await.is_err() {
            return;
        }
    }
}

/// One RESP command (`*N` then N bulk strings) from the front of `buffer`, and its length.
fn parse_resp_command(buffer: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buffer: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buffer[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buffer[at..end], end + 2))
    }
    let (header, mut at) = line(buffer, 0)?;
    let count: usize = std::str::from_utf8(header.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (length, next) = line(buffer, at)?;
        let length: usize = std::str::from_utf8(length.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if buffer.len() < next + length + 2 {
            return None;
        }
        parts.push(buffer[next..next + length].to_vec());
        at = next + length + 2;
    }
    Some((parts, at))
}
