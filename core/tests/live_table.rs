//! Incremental edits of the token table (the control plane's path): after
//! any sequence of changes, staged and written (also while more are staged),
//! the table is byte for byte the one built from scratch, staged changes are
//! found as written ones, and a refused edit changes nothing.
#![cfg(test)] // helpers are test code too, for clippy.toml's allow-*-in-tests
mod common;

use apitokens_core::compact::Stamp;
use apitokens_core::conditions::{Cidr, Conditions, Encoded};
use apitokens_core::table::{Change, Digest, Entry, LiveTable, Staged, TokenEntries};
use apitokens_core::{Role, Timestamp};
use std::collections::BTreeMap;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const HEADER: &[u8] = b"a header the edit keeps in front";

/// xorshift64*: a reproducible sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    role: Role,
    digest: Digest,
    expire: Option<Timestamp>,
    /// A previous secret in its overlap, until then.
    previous: Option<(Digest, Timestamp)>,
    /// Disabled: both its entries carry the flag.
    disabled: bool,
    /// Encoded conditions (of different lengths, so that a change of them
    /// moves other names).
    conditions: Option<Vec<u8>>,
}

impl Token {
    fn entries<'a>(&'a self, name: &'a str) -> TokenEntries<'a> {
        let conditions = self.conditions.as_deref().map(|c| Encoded::new(c).unwrap());
        TokenEntries {
            current: Entry {
                name,
                role: self.role,
                digest: self.digest,
                expire: self.expire,
                previous: false,
                disabled: self.disabled,
                conditions,
            },
            previous: self.previous.map(|(digest, until)| Entry {
                name,
                role: self.role,
                digest,
                expire: Some(until),
                previous: true,
                disabled: self.disabled,
                conditions,
            }),
        }
    }
}

fn entries(model: &BTreeMap<String, Token>) -> Vec<Entry<'_>> {
    model
        .iter()
        .flat_map(|(name, t)| {
            let e = t.entries(name);
            std::iter::once(e.current).chain(e.previous)
        })
        .collect()
}

fn from_scratch(model: &BTreeMap<String, Token>) -> Vec<u8> {
    LiveTable::build(HEADER, &entries(model))
        .unwrap()
        .table()
        .buffer()
        .to_vec()
}

/// Writes the table with every staged change, made up to `at`.
fn write(live: &mut LiveTable, at: Stamp) {
    let written = live.prepare(HEADER, at).run(Vec::new()).unwrap();
    live.commit(written).unwrap();
}

fn token(rng: &mut Rng) -> Token {
    Token {
        role: Role::ALL[rng.below(3) as usize],
        digest: Digest::of(&rng.next().to_le_bytes()),
        expire: (rng.below(3) == 0).then(|| Timestamp::from_unix(1_800_000_000 + rng.below(1000) as i64, 0)),
        previous: (rng.below(4) == 0).then(|| {
            (
                Digest::of(&rng.next().to_le_bytes()),
                Timestamp::from_unix(1_700_000_000 + rng.below(1000) as i64, 0),
            )
        }),
        disabled: rng.below(5) == 0,
        conditions: (rng.below(4) == 0).then(|| {
            let ranges = rng.below(4) as usize;
            Conditions {
                not_before: (rng.below(2) == 0).then(|| Timestamp::from_unix(1_600_000_000, 0)),
                rate_limit: (rng.below(2) == 0).then(|| apitokens_core::ratelimit::RateLimit {
                    requests: 1 + rng.below(1000) as u32,
                    per: apitokens_core::ratelimit::Per::Minute,
                    burst: 1 + rng.below(10) as u32,
                }),
                allow: (0..ranges)
                    .map(|i| Cidr::parse(&format!("10.{i}.0.0/16")).unwrap())
                    .collect(),
                except: vec![Cidr::parse("2001:db8::/32").unwrap()],
            }
            .encode()
        }),
    }
}

fn name(rng: &mut Rng, spread: u64) -> String {
    // Names of different lengths, so that every splice moves other names.
    let id = rng.below(spread);
    format!(
        "namespaces/ns-{}/apitokens/{}{id}",
        id % 7,
        "t".repeat(1 + (id % 5) as usize)
    )
}

#[test]
fn any_sequence_of_edits_equals_the_table_built_from_scratch() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..40 {
        let spread = [3, 20, 400][round % 3];
        let mut model: BTreeMap<String, Token> = BTreeMap::new();
        for _ in 0..rng.below(spread) {
            model.insert(name(&mut rng, spread), token(&mut rng));
        }
        let mut live = LiveTable::build(HEADER, &entries(&model)).unwrap();
        for generation in 0..30 {
            // A batch: creates, regenerates (with and without an overlap),
            // role or expiry changes, disables and enables, deletes, deletes
            // of absent names, several changes to one name.
            let mut batch: Vec<(String, Option<Token>)> = Vec::new();
            for _ in 0..1 + rng.below(6) {
                let n = name(&mut rng, spread);
                let change = match rng.below(8) {
                    0 => None,
                    5 => model.get(&n).map(|t| Token {
                        disabled: !t.disabled,
                        ..t.clone()
                    }),
                    1 => model.get(&n).map(|t| Token {
                        role: Role::ALL[rng.below(3) as usize],
                        ..t.clone()
                    }),
                    2 => model.get(&n).map(|t| Token {
                        expire: None,
                        ..t.clone()
                    }),
                    3 => model.get(&n).map(|t| Token {
                        digest: Digest::of(&rng.next().to_le_bytes()),
                        previous: Some((t.digest, Timestamp::from_unix(1_750_000_000, 0))),
                        ..t.clone()
                    }),
                    4 => model.get(&n).map(|t| Token {
                        previous: None,
                        ..t.clone()
                    }),
                    _ => Some(token(&mut rng)),
                };
                batch.push((n, change));
            }
            let changes: Vec<Change<'_>> = batch
                .iter()
                .map(|(n, t)| match t {
                    Some(t) => Change::Put(t.entries(n)),
                    None => Change::Remove(n),
                })
                .collect();
            // Every batch is staged. Sometimes a write of the table is
            // prepared before it and taken in after it (the batch stays
            // staged), sometimes one follows it (nothing stays staged).
            let at = Stamp {
                epoch: 1,
                generation: generation + 1,
            };
            let before = model.clone();
            let during = (rng.below(4) == 0).then(|| live.prepare(HEADER, Stamp { epoch: 1, generation }));
            let staged = live.stage(at, &changes).unwrap();
            for (n, t) in &batch {
                match t {
                    Some(t) => model.insert(n.clone(), t.clone()),
                    None => model.remove(n),
                };
            }
            let revokes = before.iter().any(|(n, t)| model.get(n) != Some(t));
            assert_eq!(
                staged,
                Staged {
                    changed: model != before,
                    revokes
                },
                "round {round}"
            );
            if let Some(flush) = during {
                live.commit(flush.run(Vec::new()).unwrap()).unwrap();
                assert_eq!(live.staged().is_empty(), !staged.changed, "round {round}");
            } else if rng.below(3) == 0 {
                write(&mut live, at);
                assert!(live.staged().is_empty());
            }
            if live.staged().is_empty() {
                assert_eq!(
                    live.table().buffer().as_slice(),
                    from_scratch(&model).as_slice(),
                    "round {round}"
                );
            }
            assert_eq!(live.len(), model.len());
            for (n, t) in &model {
                let found = live.staged().get(live.table(), &t.digest).unwrap();
                assert_eq!(
                    (found.name(), found.role(), found.expire(), found.is_disabled()),
                    (n.as_str(), t.role, t.expire, t.disabled)
                );
                assert_eq!(live.digest_of(n), Some(t.digest));
                if let Some((old, until)) = t.previous {
                    let found = live.staged().get(live.table(), &old).unwrap();
                    assert!(found.is_previous() && found.expire() == Some(until) && found.name() == n);
                    assert_eq!(found.is_disabled(), t.disabled);
                }
            }
            // What went is not found any more.
            for (n, t) in before.iter().filter(|(n, _)| !model.contains_key(*n)) {
                assert!(live.staged().get(live.table(), &t.digest).is_none(), "{n}");
                assert_eq!(live.digest_of(n), None);
            }
        }
    }
}

#[test]
fn refused_edits_change_nothing() {
    let a = Digest::of(b"a");
    let b = Digest::of(b"b");
    let entry = |name, digest| Entry {
        name,
        role: Role::Owner,
        digest,
        expire: None,
        previous: false,
        disabled: false,
        conditions: None,
    };
    let put = |name, digest| {
        Change::Put(TokenEntries {
            current: entry(name, digest),
            previous: None,
        })
    };
    let mut live = LiveTable::build(
        HEADER,
        &[
            entry("namespaces/x/apitokens/a", a),
            entry("namespaces/x/apitokens/b", b),
        ],
    )
    .unwrap();
    let before = live.table().buffer().to_vec();
    let with_previous = |name, current, previous| {
        Change::Put(TokenEntries {
            current: entry(name, current),
            previous: Some(Entry {
                previous: true,
                ..entry(name, previous)
            }),
        })
    };
    // A disabled token whose previous secret is not (each entry is decided
    // on its own flag: both must carry it).
    let half_disabled = Change::Put(TokenEntries {
        current: Entry {
            disabled: true,
            ..entry("namespaces/x/apitokens/c", Digest::of(b"c"))
        },
        previous: Some(Entry {
            previous: true,
            ..entry("namespaces/x/apitokens/c", Digest::of(b"c-old"))
        }),
    });
    let bad: [&[Change<'_>]; 7] = [
        // The digest of another token that stays.
        &[put("namespaces/x/apitokens/c", a)],
        // The same new digest twice.
        &[
            put("namespaces/x/apitokens/c", Digest::of(b"c")),
            put("namespaces/x/apitokens/d", Digest::of(b"c")),
        ],
        // A previous secret that is another token's current one.
        &[with_previous("namespaces/x/apitokens/c", Digest::of(b"c"), b)],
        // A token whose previous secret is its current one.
        &[with_previous(
            "namespaces/x/apitokens/c",
            Digest::of(b"c"),
            Digest::of(b"c"),
        )],
        // Not a token name.
        &[put("namespaces/X/apitokens/c", Digest::of(b"c"))],
        &[put("c", Digest::of(b"c"))],
        &[half_disabled],
    ];
    for changes in bad {
        assert!(live.stage(Stamp::default(), changes).is_err(), "{changes:?}");
        assert_eq!(live.table().buffer().as_slice(), before.as_slice());
        assert!(live.staged().is_empty());
    }
    // A digest may move to another name when its old token goes in the same batch.
    let at = Stamp {
        epoch: 1,
        generation: 1,
    };
    live.stage(
        at,
        &[
            Change::Remove("namespaces/x/apitokens/a"),
            put("namespaces/x/apitokens/c", a),
        ],
    )
    .unwrap();
    write(&mut live, at);
    assert_eq!(live.table().get(&a).unwrap().name(), "namespaces/x/apitokens/c");
    assert_eq!(live.digest_of("namespaces/x/apitokens/a"), None);
}

#[test]
fn unchanged_tokens_are_no_edit() {
    let d = Digest::of(b"d");
    let e = Entry {
        name: "namespaces/x/apitokens/d",
        role: Role::Viewer,
        digest: d,
        expire: None,
        previous: false,
        disabled: false,
        conditions: None,
    };
    let mut live = LiveTable::build(HEADER, &[e]).unwrap();
    let token = TokenEntries {
        current: e,
        previous: None,
    };
    let staged = live
        .stage(
            Stamp::default(),
            &[Change::Put(token), Change::Remove("namespaces/x/apitokens/none")],
        )
        .unwrap();
    assert_eq!(staged, Staged::default());
    assert!(live.staged().is_empty());
    // Disabling it is a change, and one that revokes (it admitted it).
    let disabled = TokenEntries {
        current: Entry { disabled: true, ..e },
        previous: None,
    };
    let at = Stamp {
        epoch: 1,
        generation: 1,
    };
    let staged = live.stage(at, &[Change::Put(disabled)]).unwrap();
    assert_eq!(
        staged,
        Staged {
            changed: true,
            revokes: true
        }
    );
    assert!(live.staged().get(live.table(), &d).unwrap().is_disabled());
    write(&mut live, at);
    assert!(live.table().get(&d).unwrap().is_disabled());
    assert_eq!(live.token("namespaces/x/apitokens/d"), Some(disabled));
}
