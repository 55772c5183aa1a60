vcl 4.1;
# Varnish for docker-compose.yml (from tests/fixtures/varnish-xkey.vcl): caches an origin, tags objects with xkey (or the
# origin's Surrogate-Key header), and accepts purges from private networks only:
#   PURGE /path                                  -> purge that URL (hard)
#   PURGE / with "xkey-purge: k1 k2"             -> hard purge every object tagged k1 or k2
#   PURGE / with "xkey-softpurge: k1"            -> soft purge (served stale while refetched)
#   BAN / with "X-Ban-Url: <regex>"              -> ban every object whose URL matches
# The synthetic response carries the number of objects purged in X-Purged-Count.
import std;
import xkey;
import purge;

backend origin { .host = "origin"; .port = "80"; }

# The daemon reaches Varnish over the compose network.
acl purgers { "127.0.0.1"; "::1"; "10.0.0.0"/8; "172.16.0.0"/12; "192.168.0.0"/16; }

sub vcl_recv {
    if (req.method == "PURGE" || req.method == "BAN") {
        if (client.ip !~ purgers) { return (synth(403, "Forbidden")); }
    }
    if (req.method == "PURGE") {
        if (req.http.xkey-purge) {
            set req.http.x-n = xkey.purge(req.http.xkey-purge);
            return (synth(200, "xkey purged " + req.http.x-n));
        }
        if (req.http.xkey-softpurge) {
            set req.http.x-n = xkey.softpurge(req.http.xkey-softpurge);
            return (synth(200, "xkey softpurged " + req.http.x-n));
        }
        return (hash);
    }
    if (req.method == "BAN") {
        if (!req.http.x-ban-url) { return (synth(400, "X-Ban-Url required")); }
        if (std.ban("obj.http.x-url ~ " + req.http.x-ban-url)) { return (synth(200, "Ban added")); }
        return (synth(400, std.ban_error()));
    }
}

sub vcl_hit  { if (req.method == "PURGE") { set req.http.x-n = purge.hard(); return (synth(200, "url purged " + req.http.x-n)); } }
sub vcl_miss { if (req.method == "PURGE") { set req.http.x-n = purge.hard(); return (synth(200, "url purged " + req.http.x-n)); } }

sub vcl_backend_response {
    set beresp.http.x-url = bereq.url;
    if (beresp.http.Surrogate-Key && !beresp.http.xkey) { set beresp.http.xkey = beresp.http.Surrogate-Key; }
    set beresp.grace = 1h;
}

sub vcl_deliver {
    if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
    set resp.http.X-Cache-Hits = obj.hits;
    unset resp.http.x-url;
    unset resp.http.xkey;
}

sub vcl_synth {
    set resp.http.Content-Type = "text/plain";
    if (req.http.x-n) { set resp.http.X-Purged-Count = req.http.x-n; }
    set resp.body = resp.reason + {"
"};
    return (deliver);
}
