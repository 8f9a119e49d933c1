//! Fuzzes `BtPath::from_str`, the parser of paths from requests and writecaps:
//! a parsed path displays as the exact input, re-parses equal, survives its serde
//! (postcard) form, and `parent`, `contains` and `join` agree with each other.
#![no_main]

use blocktree_core::BtPath;
use blocktree_fuzz::show;
use libfuzzer_sys::fuzz_target;

/// Parents checked, from the path up.
const MAX_WALK: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = text.parse::<BtPath>();
    show(&parsed);
    let Ok(path) = parsed else {
        return;
    };

    // Principal ids have one spelling and components are kept verbatim, so the
    // display is the input itself.
    let shown = path.to_string();
    assert_eq!(shown, text);
    assert_eq!(shown.parse::<BtPath>().as_ref(), Ok(&path));
    let _ = format!("{path:?}");
    let bytes = postcard::to_allocvec(&path).expect("serializing a path");
    assert_eq!(
        postcard::from_bytes::<BtPath>(&bytes).ok().as_ref(),
        Some(&path)
    );

    assert!(path.contains(&path));
    // Up the first few levels: each step copies the components, so walking a
    // 2000-component path to the root would make every run quadratic.
    let mut child = path.clone();
    for _ in 0..MAX_WALK {
        let Some(parent) = child.parent() else {
            break;
        };
        assert!(parent.contains(&child) && parent.contains(&path));
        assert!(!child.contains(&parent));
        assert_eq!(parent.root(), path.root());
        let last = child
            .components()
            .last()
            .expect("a path with a parent has components");
        assert_eq!(parent.join(last).as_ref(), Ok(&child));
        child = parent;
    }
    let root = BtPath::root_of(path.root());
    assert!(root.contains(&path) && root.parent().is_none());
    assert_eq!(child.components().is_empty(), child == root);
    show(&path.join("x"));
});
