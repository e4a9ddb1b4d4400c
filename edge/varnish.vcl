vcl 4.1;

# Varnish in front of blotcdn's HTTP origin. The origin's Cache-Control says
# everything: the current version of a file is immutable, an older cache id
# lives 60 s, an unknown cache id or blog is never stored.
# The tests run this very file, with the port below rewritten.

backend blotcdn {
    .host = "127.0.0.1";
    .port = "8080";
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    # Drop a whole blog: curl -X BAN -H 'Surrogate-Key: <blog id>' http://edge/
    if (req.method == "BAN") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        if (!req.http.Surrogate-Key ~ "^[A-Za-z0-9_-]{1,64}$") {
            return (synth(400, "Surrogate-Key must be a blog id"));
        }
        ban("obj.http.Surrogate-Key == " + req.http.Surrogate-Key);
        return (synth(200, "Banned"));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    # Asset URLs are public: cookies and credentials must not split the cache.
    unset req.http.Cookie;
    unset req.http.Authorization;
    return (hash);
}

sub vcl_backend_response {
    if (beresp.http.Cache-Control ~ "no-store") {
        # Remember for a while that this URL is not cacheable (hit-for-miss).
        set beresp.uncacheable = true;
        set beresp.ttl = 120s;
        return (deliver);
    }
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
