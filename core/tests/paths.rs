//! Self-certifying paths and principal ids: round trips, containment, and every
//! way text can fail to be a path.
#![allow(clippy::unwrap_used)]

mod common;

use blocktree_core::encoding::{self, DecodeError, Kind};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::{EncryptionKeyPair, SigningKeyPair};
use blocktree_core::path::{BtPath, MAX_COMPONENT_LEN, MAX_PATH_LEN, PathError};
use blocktree_core::principal::{PRINCIPAL_TEXT_LEN, PrincipalId, PrincipalParseError};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::{Certificate, Writecap};
use common::{path_under, principal_of, signing_key};
use proptest::prelude::*;

const BASE64URL: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn principal_strategy() -> impl Strategy<Value = PrincipalId> {
    any::<[u8; 32]>().prop_map(PrincipalId::from_bytes)
}

/// Any valid component: no '/', no NUL, not "." or "..", any other Unicode.
fn component_strategy() -> impl Strategy<Value = String> {
    "[^/\\x00]{1,12}".prop_filter("dot components are invalid", |c| c != "." && c != "..")
}

fn build(root: PrincipalId, components: &[String]) -> BtPath {
    components
        .iter()
        .fold(BtPath::root_of(root), |path, component| {
            path.join(component).unwrap()
        })
}

fn path_strategy() -> impl Strategy<Value = BtPath> {
    (
        principal_strategy(),
        prop::collection::vec(component_strategy(), 0..8),
    )
        .prop_map(|(root, components)| build(root, &components))
}

/// Paths over two roots and a two-letter alphabet, so that prefixes, equal paths
/// and near misses ("a" vs "ab") come up often.
fn crowded_path_strategy() -> impl Strategy<Value = BtPath> {
    (prop::bool::ANY, prop::collection::vec("[ab]{1,2}", 0..4)).prop_map(
        |(second_root, components)| {
            let root = PrincipalId::from_bytes([if second_root { 2 } else { 1 }; 32]);
            build(root, &components)
        },
    )
}

/// Containment decided on the text alone: equal, or a prefix ending at a '/'.
fn text_contains(outer: &BtPath, inner: &BtPath) -> bool {
    let (outer, inner) = (outer.to_string(), inner.to_string());
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

/// The path as it comes back out of the binary format, inside a certificate.
fn through_writecap_encoding(path: &BtPath, signer: &SigningKeyPair) -> BtPath {
    let certificate =
        Certificate::sign(signer, principal_of(signer), path.clone(), Timestamp(1)).unwrap();
    let encoded = encoding::encode(&Writecap::from_chain(vec![certificate]));
    let decoded: Writecap = encoding::decode(&encoded).unwrap();
    decoded.chain()[0].path.clone()
}

fn parse(text: &str) -> Result<BtPath, PathError> {
    text.parse()
}

fn some_root() -> PrincipalId {
    PrincipalId::from_bytes([0x5a; 32])
}

fn some_root_text() -> String {
    some_root().to_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn display_then_parse_is_identity(path in path_strategy()) {
        let text = path.to_string();
        prop_assert!(text.starts_with('/'));
        prop_assert_eq!(parse(&text), Ok(path.clone()));
        prop_assert_eq!(
            text.split('/').count(),
            path.components().len() + 2,
            "one '/' per component plus the root"
        );
    }

    #[test]
    fn a_parsed_path_has_one_spelling(text in "/[A-Za-z0-9_./-]{0,60}|/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA(/[a.]{0,3}){0,4}") {
        // Whatever parses prints back exactly as it was written.
        if let Ok(path) = parse(&text) {
            prop_assert_eq!(path.to_string(), text);
        }
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(text in any::<String>()) {
        let _ = parse(&text);
        let _ = text.parse::<PrincipalId>();
    }

    #[test]
    fn paths_survive_the_binary_format(path in path_strategy()) {
        let signer = signing_key();
        prop_assert_eq!(through_writecap_encoding(&path, &signer), path);
    }

    #[test]
    fn contains_is_reflexive(path in path_strategy()) {
        prop_assert!(path.contains(&path));
    }

    #[test]
    fn contains_holds_exactly_for_component_prefixes(
        outer in crowded_path_strategy(),
        inner in crowded_path_strategy(),
    ) {
        let expected = outer.root() == inner.root()
            && inner.components().starts_with(outer.components());
        prop_assert_eq!(outer.contains(&inner), expected);
        prop_assert_eq!(outer.contains(&inner), text_contains(&outer, &inner));
        if outer.contains(&inner) && inner.contains(&outer) {
            prop_assert_eq!(&outer, &inner, "containment both ways means equal paths");
        }
    }

    #[test]
    fn contains_is_transitive(
        a in crowded_path_strategy(),
        b in crowded_path_strategy(),
        c in crowded_path_strategy(),
    ) {
        if a.contains(&b) && b.contains(&c) {
            prop_assert!(a.contains(&c));
        }
    }

    #[test]
    fn extending_a_path_keeps_it_contained(
        base in path_strategy(),
        middle in prop::collection::vec(component_strategy(), 0..3),
        tail in prop::collection::vec(component_strategy(), 0..3),
    ) {
        let extend = |path: &BtPath, components: &[String]| {
            components.iter().fold(path.clone(), |p, c| p.join(c).unwrap())
        };
        let b = extend(&base, &middle);
        let c = extend(&b, &tail);
        prop_assert!(base.contains(&b));
        prop_assert!(b.contains(&c));
        prop_assert!(base.contains(&c));
        prop_assert_eq!(c.contains(&base), middle.is_empty() && tail.is_empty());
    }

    #[test]
    fn paths_under_another_root_are_never_contained(
        root_a in principal_strategy(),
        root_b in principal_strategy(),
        components in prop::collection::vec(component_strategy(), 0..4),
    ) {
        prop_assume!(root_a != root_b);
        let a = build(root_a, &components);
        let b = build(root_b, &components);
        prop_assert!(!a.contains(&b));
        prop_assert!(!b.contains(&a));
    }

    #[test]
    fn parent_undoes_join(path in path_strategy(), component in component_strategy()) {
        let child = path.join(&component).unwrap();
        prop_assert_eq!(child.parent(), Some(path.clone()));
        prop_assert_eq!(child.components().last(), Some(&component));
        prop_assert_eq!(child.root(), path.root());
        prop_assert!(path.contains(&child));
        prop_assert!(!child.contains(&path));
    }

    #[test]
    fn principal_ids_round_trip_as_text(id in principal_strategy()) {
        let text = id.to_string();
        prop_assert_eq!(text.len(), PRINCIPAL_TEXT_LEN);
        prop_assert!(text.chars().all(|c| BASE64URL.contains(c)));
        prop_assert_eq!(text.parse::<PrincipalId>(), Ok(id));
        prop_assert_eq!(PrincipalId::from_bytes(*id.as_bytes()), id);
    }

    #[test]
    fn principal_ids_with_stray_trailing_bits_are_rejected(
        id in principal_strategy(),
        low_bits in 1usize..4,
    ) {
        // 43 characters carry 258 bits for 256: the last two bits must be zero.
        let text = id.to_string();
        let last = BASE64URL.find(text.chars().last().unwrap()).unwrap();
        let altered = BASE64URL.as_bytes()[(last & !3) | low_bits] as char;
        let spelled = format!("{}{altered}", &text[..PRINCIPAL_TEXT_LEN - 1]);
        prop_assert!(matches!(
            spelled.parse::<PrincipalId>(),
            Err(PrincipalParseError::Encoding(_))
        ));
    }
}

#[test]
fn root_path_round_trips_and_has_no_parent() {
    let root = BtPath::root_of(some_root());
    assert_eq!(root.to_string(), format!("/{}", some_root_text()));
    assert_eq!(parse(&root.to_string()), Ok(root.clone()));
    assert!(root.components().is_empty());
    assert_eq!(root.parent(), None);
}

#[test]
fn component_boundary_prefix_is_not_containment() {
    let ab = path_under(some_root(), &["ab"]);
    let abc = path_under(some_root(), &["abc"]);
    let ab_c = path_under(some_root(), &["ab", "c"]);
    assert!(!ab.contains(&abc), "/R/ab does not contain /R/abc");
    assert!(ab.contains(&ab_c));
}

#[test]
fn empty_text_is_rejected() {
    assert_eq!(parse(""), Err(PathError::Empty));
}

#[test]
fn relative_paths_are_rejected() {
    let root = some_root_text();
    assert_eq!(parse(&root), Err(PathError::NotAbsolute));
    assert_eq!(parse(&format!("{root}/a")), Err(PathError::NotAbsolute));
    assert_eq!(parse("a/b"), Err(PathError::NotAbsolute));
}

#[test]
fn empty_components_are_rejected() {
    let root = some_root_text();
    assert_eq!(parse("/"), Err(PathError::EmptyComponent(0)));
    assert_eq!(parse("//"), Err(PathError::EmptyComponent(0)));
    assert_eq!(
        parse(&format!("//{root}")),
        Err(PathError::EmptyComponent(0))
    );
    assert_eq!(
        parse(&format!("/{root}//a")),
        Err(PathError::EmptyComponent(1))
    );
    assert_eq!(
        parse(&format!("/{root}/a//b")),
        Err(PathError::EmptyComponent(2))
    );
    assert_eq!(
        parse(&format!("/{root}/")),
        Err(PathError::EmptyComponent(1)),
        "trailing slash"
    );
    assert_eq!(
        parse(&format!("/{root}/a/b/")),
        Err(PathError::EmptyComponent(3)),
        "trailing slash"
    );
    let base = BtPath::root_of(some_root());
    assert_eq!(base.join(""), Err(PathError::EmptyComponent(1)));
    assert!(base.join("a/b").is_err(), "join takes one component");
}

#[test]
fn dot_components_are_rejected() {
    let root = some_root_text();
    for dots in [".", ".."] {
        assert_eq!(
            parse(&format!("/{root}/{dots}")),
            Err(PathError::DotComponent(dots.into()))
        );
        assert_eq!(
            parse(&format!("/{root}/a/{dots}/b")),
            Err(PathError::DotComponent(dots.into()))
        );
        assert_eq!(
            BtPath::root_of(some_root()).join(dots),
            Err(PathError::DotComponent(dots.into()))
        );
    }
    for fine in ["...", ".a", "a.", ".hidden"] {
        assert!(parse(&format!("/{root}/{fine}")).is_ok(), "{fine}");
    }
}

#[test]
fn first_component_of_the_wrong_length_is_rejected() {
    let root = some_root_text();
    assert_eq!(
        parse("/abc/a"),
        Err(PathError::NotAPrincipal(PrincipalParseError::Length(3)))
    );
    assert_eq!(
        parse(&format!("/{}", &root[..42])),
        Err(PathError::NotAPrincipal(PrincipalParseError::Length(42)))
    );
    assert_eq!(
        parse(&format!("/{root}A/a")),
        Err(PathError::NotAPrincipal(PrincipalParseError::Length(44)))
    );
}

#[test]
fn first_component_that_is_not_base64url_is_rejected() {
    let root = some_root_text();
    // Standard-alphabet '+', padding, and a non-ASCII character (2 bytes).
    let plus = format!("+{}", &root[1..]);
    let padded = format!("{}=", &root[..42]);
    let accented = format!("{}é", &root[..41]);
    for bad in [plus, padded, accented] {
        assert_eq!(bad.len(), PRINCIPAL_TEXT_LEN);
        assert!(
            matches!(
                parse(&format!("/{bad}/a")),
                Err(PathError::NotAPrincipal(PrincipalParseError::Encoding(_)))
            ),
            "{bad}"
        );
    }
}

#[test]
fn first_component_with_non_canonical_trailing_bits_is_rejected() {
    let zeros = "A".repeat(PRINCIPAL_TEXT_LEN);
    assert_eq!(
        zeros.parse::<PrincipalId>(),
        Ok(PrincipalId::from_bytes([0; 32]))
    );
    // 'E' (000100) sets the last data bit; 'B' (000001) a padding bit.
    let mut last_bit = [0u8; 32];
    last_bit[31] = 1;
    let e = format!("{}E", &zeros[..42]);
    assert_eq!(
        e.parse::<PrincipalId>(),
        Ok(PrincipalId::from_bytes(last_bit))
    );
    let b = format!("{}B", &zeros[..42]);
    assert!(matches!(
        parse(&format!("/{b}/a")),
        Err(PathError::NotAPrincipal(PrincipalParseError::Encoding(_)))
    ));
}

#[test]
fn nul_bytes_are_rejected() {
    let root = some_root_text();
    assert_eq!(parse(&format!("/{root}/a\0b")), Err(PathError::NulByte(1)));
    assert_eq!(parse(&format!("/{root}/a/\0")), Err(PathError::NulByte(2)));
    assert_eq!(
        BtPath::root_of(some_root()).join("x\0"),
        Err(PathError::NulByte(1))
    );
}

#[test]
fn components_over_255_bytes_are_rejected() {
    let root = some_root_text();
    let longest = "n".repeat(MAX_COMPONENT_LEN);
    let parsed = parse(&format!("/{root}/{longest}")).unwrap();
    assert_eq!(parsed.components(), [longest]);

    let too_long = "n".repeat(MAX_COMPONENT_LEN + 1);
    assert_eq!(
        parse(&format!("/{root}/a/{too_long}")),
        Err(PathError::ComponentTooLong {
            index: 2,
            len: MAX_COMPONENT_LEN + 1
        })
    );
    // Bytes, not characters: 128 two-byte characters are 256 bytes.
    let wide = "é".repeat(128);
    assert_eq!(
        BtPath::root_of(some_root()).join(&wide),
        Err(PathError::ComponentTooLong { index: 1, len: 256 })
    );
}

#[test]
fn paths_over_4096_bytes_are_rejected() {
    let full = "c".repeat(MAX_COMPONENT_LEN);
    let mut text = format!("/{}", some_root_text());
    for _ in 0..15 {
        text.push('/');
        text.push_str(&full);
    }
    let room = MAX_PATH_LEN - text.len() - 1;
    let at_limit = format!("{text}/{}", "d".repeat(room));
    assert_eq!(at_limit.len(), MAX_PATH_LEN);
    assert_eq!(parse(&at_limit).unwrap().to_string(), at_limit);

    let over = format!("{text}/{}", "d".repeat(room + 1));
    assert_eq!(parse(&over), Err(PathError::TooLong(MAX_PATH_LEN + 1)));

    let base = parse(&text).unwrap();
    assert_eq!(base.join(&"d".repeat(room)).unwrap().to_string(), at_limit);
    assert_eq!(
        base.join(&"d".repeat(room + 1)),
        Err(PathError::TooLong(MAX_PATH_LEN + 1))
    );
}

#[test]
fn decoding_rejects_an_invalid_path_inside_a_certificate() {
    let signer = signing_key();
    let path = path_under(principal_of(&signer), &["~~"]);
    let certificate =
        Certificate::sign(&signer, principal_of(&signer), path, Timestamp(1)).unwrap();
    let mut encoded = encoding::encode(&Writecap::from_chain(vec![certificate]));
    let at = encoded.windows(2).position(|w| w == b"~~").unwrap();
    encoded[at..at + 2].copy_from_slice(b"..");
    assert!(matches!(
        encoding::decode::<Writecap>(&encoded),
        Err(DecodeError::Malformed {
            kind: Kind::Writecap,
            ..
        })
    ));
}

#[test]
fn principal_ids_name_keys_by_the_sha256_of_their_spki() {
    let signing = SigningKeyPair::generate().unwrap();
    let encryption = EncryptionKeyPair::generate().unwrap();
    for (principal, spki) in [
        (signing.public().principal(), signing.public().spki_der()),
        (
            encryption.public().principal(),
            encryption.public().spki_der(),
        ),
    ] {
        let digest = HashAlgorithm::Sha256.hash(&[&spki]);
        assert_eq!(principal.as_bytes().as_slice(), digest.as_bytes());
        assert_eq!(principal, PrincipalId::from_spki_der(&spki));
        let text = principal.to_string();
        assert_eq!(text.len(), PRINCIPAL_TEXT_LEN);
        assert_eq!(text.parse::<PrincipalId>(), Ok(principal));
    }
}

#[test]
fn principal_text_of_the_wrong_length_is_rejected() {
    let text = some_root_text();
    assert_eq!(
        "".parse::<PrincipalId>(),
        Err(PrincipalParseError::Length(0))
    );
    assert_eq!(
        text[..42].parse::<PrincipalId>(),
        Err(PrincipalParseError::Length(42))
    );
    assert_eq!(
        format!("{text}A").parse::<PrincipalId>(),
        Err(PrincipalParseError::Length(44))
    );
}
