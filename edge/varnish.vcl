vcl 4.1;

import std;

# Varnish in front of blotcdn's HTTP origin. The origin's Cache-Control says
# everything: the current version of a file is immutable, an older cache id
# lives 60 s, an unknown cache id or blog is never stored.
#
# Purges: every answer carries `Surrogate-Key: <blog id>` (a permanent
# asset's also `<blog id>/<hash>`), and blotcdn sends `BAN` with the keys to
# drop, space-separated. Pages the app tags with `Surrogate-Key: <blog id>`
# and `Surrogate-Control: max-age=N` are kept for N seconds, so the one purge
# blotcdn sends on publish (`purge_on_publish = true`) drops them.
#
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
    # Drop everything tagged with any of the keys:
    #   curl -X BAN -H 'Surrogate-Key: <blog id> <blog id>/<hash>' http://edge/
    if (req.method == "BAN") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        if (req.http.Surrogate-Key !~ "^[A-Za-z0-9_/-]{1,256}( [A-Za-z0-9_/-]{1,256}){0,63}$") {
            return (synth(400, "Surrogate-Key must be up to 64 space-separated keys of [A-Za-z0-9_/-]"));
        }
        # An object goes when one of its keys is one of these: "a b" bans
        # (^|space)(a|b)(space|$). Keys hold no regex metacharacters.
        # (The regex holds no space, so it needs no quotes in the ban.)
        ban("obj.http.Surrogate-Key ~ (^|[[:space:]])(" + regsuball(req.http.Surrogate-Key, " ", "|") + ")([[:space:]]|$)");
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

sub vcl_hash {
    # The TLS edge for custom domains (edge/Caddyfile) names the domain a
    # request came in on, and the origin answers as that domain's blog. A
    # reader can send the header too: it is part of the key, so an answer
    # made for it is never handed to a request without it (the origin also
    # says `Vary: X-Blotcdn-Domain`). The built-in vcl_hash adds URL and Host.
    if (req.http.X-Blotcdn-Domain) {
        hash_data(req.http.X-Blotcdn-Domain);
    }
}
sub vcl_backend_response {
    # A page the app tagged for purging (`Surrogate-Key: <blog id>` and
    # `Surrogate-Control: max-age=N`): kept for N seconds or until a purge,
    # whatever its Cache-Control tells browsers.
    if (beresp.http.Surrogate-Key && beresp.http.Surrogate-Control ~ "max-age=[0-9]+"
        && !beresp.http.Set-Cookie && beresp.status == 200) {
        set beresp.ttl = std.duration(
            regsub(beresp.http.Surrogate-Control, "^.*max-age=([0-9]+).*$", "\1") + "s", 1d);
        unset beresp.http.Surrogate-Control;
        set beresp.grace = 10s;
        return (deliver);
    }
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
