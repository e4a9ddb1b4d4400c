//! Outgoing HTTP(S) requests (purge targets, the legacy bucket): one
//! hyper client over rustls with the webpki roots, HTTP or HTTPS, kept-alive
//! connections, `TCP_NODELAY`.

use std::time::Duration;

use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client whose connections give up connecting after `connect_timeout`,
/// keeping up to `idle_per_host` idle connections to each host.
pub fn client<B>(connect_timeout: Duration, idle_per_host: usize) -> Client<Https, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(idle_per_host).build(https)
}

/// The first `max` bytes of an answer's body, for reading what an error
/// answer says or what a small answer holds: the rest is not read (the
/// connection is dropped with it), so an answer of any length, or one that
/// never ends, costs at most `max` bytes of memory. The caller bounds the
/// time.
pub async fn body_prefix<B>(body: B, max: usize) -> Result<bytes::Bytes, String>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    while out.len() < max {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data[..data.len().min(max - out.len())]);
                }
            }
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    /// An answer far longer than the bound, or one that never ends, is read
    /// up to the bound and no further.
    #[tokio::test]
    async fn only_the_prefix_of_a_long_or_endless_body_is_read() {
        use http_body_util::StreamBody;
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(vec![7u8; 64 * 1024])))
        });
        let got = super::body_prefix(StreamBody::new(endless), 100_000).await.unwrap();
        assert_eq!(got.len(), 100_000);
        let short = http_body_util::Full::new(bytes::Bytes::from_static(b"short"));
        assert_eq!(super::body_prefix(short, 100_000).await.unwrap(), &b"short"[..]);
    }
}
