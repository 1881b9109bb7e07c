use proptest::prelude::*;

use super::*;

fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    parse_header(bytes, bytes.len() as u64, DEFAULT_MAX_HEADER)
}

#[test]
fn accepts_a_valid_file_with_padding_and_metadata() {
    let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}   "#;
    let parsed = parse(&file(h, &[0u8; 16])).unwrap();
    assert_eq!(parsed.tensors.len(), 2);
    assert_eq!(parsed.tensors[0].name, "a");
    assert_eq!(parsed.metadata["format"], "pt");
    assert_eq!(parsed.data_start, 8 + h.len() as u64);
}

#[test]
fn refuses_every_malformed_header() {
    let t = |o: &str| format!(r#"{{"a":{{"dtype":"F32","shape":[1],"data_offsets":{o}}}}}"#);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 2, 3], "too short"),
        (u64::MAX.to_le_bytes().to_vec(), "u64::MAX length"),
        (
            {
                let mut f = 1000u64.to_le_bytes().to_vec();
                f.extend_from_slice(b"{}");
                f
            },
            "length past end",
        ),
        (file(" {}", &[]), "leading space"),
        (file("{\"a\":1}\0\0", &[]), "NUL padding"),
        (file("[]", &[]), "array"),
        (file("{\"a\":", &[]), "truncated JSON"),
        (
            file(&String::from_utf8_lossy(&[b'{', 0xff, b'}']), &[]),
            "not utf8",
        ),
        (
            file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            "duplicate",
        ),
        (
            file(
                r#"{"a\u0000b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            "NUL in name",
        ),
        (
            file(
                r#"{"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            "empty name",
        ),
        (
            file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
                &[0; 8],
            ),
            "overlap",
        ),
        (
            file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 8],
            ),
            "tied",
        ),
        (file(&t("[4,8]"), &[0; 8]), "gap at start"),
        (file(&t("[4,0]"), &[0; 8]), "reversed"),
        (file(&t("[0,4]"), &[0; 8]), "trailing bytes"),
        (file(&t("[0,4]"), &[0; 2]), "past end"),
        (
            file(
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            "dtype x shape",
        ),
        (
            file(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            "shape overflow",
        ),
        (
            file(
                r#"{"a":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}"#,
                &[0; 1],
            ),
            "unknown dtype",
        ),
        (
            file(r#"{"__metadata__":{"a":1}}"#, &[]),
            "non-string metadata",
        ),
    ];
    for (bytes, what) in cases {
        assert!(parse(&bytes).is_err(), "{what}: accepted");
    }
}

#[test]
fn error_messages_name_the_problem() {
    let dup = file(
        r#"{"x.y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x.y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    assert_eq!(
        parse(&dup).unwrap_err(),
        HeaderError::Duplicate("x.y".into())
    );
    let dtype = file(
        r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
        &[0; 1],
    );
    assert!(parse(&dtype).unwrap_err().to_string().contains("\"Q4\""));
}

#[test]
fn header_limit_is_enforced_before_reading() {
    let f = file(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    );
    assert!(matches!(
        parse_header(&f, f.len() as u64, 10),
        Err(HeaderError::HeaderTooLarge { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    // Random bytes never panic the parser.
    #[test]
    fn fuzz_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse(&bytes);
    }

    // Random mutations of a valid file never panic, and whatever is accepted is consistent.
    #[test]
    fn fuzz_mutated_headers(pos in 0usize..200, byte in any::<u8>(), len_delta in -3i64..3) {
        let h = r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}"#;
        let mut f = file(h, &[7u8; 12]);
        let i = pos % f.len();
        f[i] = byte;
        let new_len = (f.len() as i64 + len_delta).max(0) as usize;
        f.resize(new_len, 0);
        if let Ok(parsed) = parse(&f) {
            let covered: u64 = parsed.tensors.iter().map(|t| t.end - t.start).sum();
            prop_assert_eq!(parsed.data_start + covered, f.len() as u64);
        }
    }
}
