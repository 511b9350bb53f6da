//! Parts of a request that make an upstream run another method or route
//! another URL than the `:method` and `:path` the filter decides on.
//!
//! - Method overrides: the headers below, `_method` in the query string (any
//!   method), and `_method` in the body of a POST (Laravel, Symfony, Rails,
//!   Express's `method-override`). Every method a request could be
//!   overridden to must be permitted as well. The filter does not read
//!   bodies, so a POST that carries a body must be permitted for every verb an
//!   override could produce (see [`BODY_OVERRIDE_METHODS`]).
//! - URL overrides: headers some frameworks route on instead of the request
//!   line (Symfony and Zend behind IIS). A request carrying one is refused
//!   unless the configuration says otherwise ([`UrlOverrides`]).

/// Method-override headers some frameworks honour: a request carrying one must
/// be permitted for the overriding method too, or a GET could delete.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// Headers some frameworks take the request's URL from instead of its path.
pub const URL_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// What a POST with a body may turn into through a `_method` field of the
/// body: the frameworks that read it (form fields in Laravel, Symfony, Rails;
/// JSON fields in Laravel; any body parser in Express's `method-override`)
/// accept every method. Buffering and parsing the body (per content type and
/// per framework) would cost every such request latency and memory and still
/// miss a parser; requiring the verbs these methods mean costs nothing with
/// the built-in rules, where every role that may create on a path may also do
/// everything else there. PATCH means the same verb as PUT.
pub const BODY_OVERRIDE_METHODS: [&[u8]; 3] = [b"GET", b"PUT", b"DELETE"];

/// What the filter does with a request that carries a URL-override header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UrlOverrides {
    /// Refuse it (400 `invalid_request`): the default.
    Reject,
    /// Allow it, and remove the headers before it goes upstream.
    Remove,
    /// Allow it with the headers: only when no upstream routes on them.
    Forward,
}

impl UrlOverrides {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reject" => Some(Self::Reject),
            "remove" => Some(Self::Remove),
            "forward" => Some(Self::Forward),
            _ => None,
        }
    }
}

/// Longest override value kept; longer ones are no method at all.
const MAX_METHOD: usize = 16;

/// An override's method as frameworks read it: decoded and in upper case
/// (Symfony, Rack and `method-override` all upper-case the value). Kept on
/// the stack; a value that does not fit is empty, which is no method and so
/// never permitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverrideMethod {
    buf: [u8; MAX_METHOD],
    len: usize,
}

impl OverrideMethod {
    /// From a header value.
    pub fn from_header(value: &[u8]) -> Self {
        Self::from_bytes(value.iter().copied())
    }

    fn from_bytes(bytes: impl Iterator<Item = u8>) -> Self {
        let mut method = Self {
            buf: [0; MAX_METHOD],
            len: 0,
        };
        for c in bytes {
            match method.buf.get_mut(method.len) {
                Some(slot) => *slot = c.to_ascii_uppercase(),
                None => return Self { len: 0, ..method },
            }
            method.len += 1;
        }
        method
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

/// The values of every `_method` parameter in the query string of `path`.
///
/// Parameter names are read as the most permissive parser reads them, so that
/// none that some framework takes for `_method` is missed: split on `&` and
/// `;`, percent- and `+`-decoded, leading spaces dropped, `.` and space read
/// as `_` (PHP), cut at `[` (PHP arrays), any ASCII case. Matching a name no
/// framework reads only means one more check.
pub fn query_methods(path: &[u8]) -> impl Iterator<Item = OverrideMethod> + '_ {
    let query = path
        .iter()
        .position(|c| *c == b'?')
        .and_then(|q| path.get(q + 1..))
        .unwrap_or_default();
    query.split(|c| *c == b'&' || *c == b';').filter_map(|param| {
        let (name, value) = match param.iter().position(|c| *c == b'=') {
            Some(eq) => (param.get(..eq)?, param.get(eq + 1..)?),
            None => (param, &b""[..]),
        };
        is_method_name(name).then(|| OverrideMethod::from_bytes(Decoded(value)))
    })
}

fn is_method_name(raw: &[u8]) -> bool {
    const NAME: &[u8] = b"_method";
    // Cheap exit for the usual parameter: no `_`, `.`, `%` or space-like byte
    // can start `_method` once leading spaces are dropped.
    if !raw.iter().any(|c| matches!(c, b'_' | b'.' | b'%' | b'+' | b' ')) {
        return false;
    }
    let mut name = Decoded(raw).skip_while(|c| *c == b' ').map(|c| match c {
        b'.' | b' ' => b'_',
        c => c.to_ascii_lowercase(),
    });
    let mut want = NAME.iter();
    loop {
        match (name.next(), want.next()) {
            (None | Some(b'['), None) => return true,
            (Some(c), Some(w)) if c == *w => {}
            _ => return false,
        }
    }
}

/// Bytes of a form-encoded string, decoded: `%XX` is that byte (a `%` not
/// followed by two hex digits stays, as PHP leaves it), `+` is a space.
struct Decoded<'a>(&'a [u8]);

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let hex = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
        if let [b'%', hi, lo, rest @ ..] = self.0 {
            if let (Some(hi), Some(lo)) = (hex(*hi), hex(*lo)) {
                self.0 = rest;
                return Some(hi << 4 | lo);
            }
        }
        match self.0 {
            [c, rest @ ..] => {
                self.0 = rest;
                Some(if *c == b'+' { b' ' } else { *c })
            }
            [] => None,
        }
    }
}
