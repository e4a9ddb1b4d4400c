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
