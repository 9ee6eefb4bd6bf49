//! Unit tests of request validation and reply encoding: one test per rule.

use super::*;

const SIZE: u64 = 1 << 20;

fn limits() -> ExportLimits {
    ExportLimits {
        size_bytes: SIZE,
        read_only: false,
        max_payload: 64 * 1024,
        alignment: 1,
    }
}

fn read_only() -> ExportLimits {
    ExportLimits {
        read_only: true,
        ..limits()
    }
}

fn aligned(alignment: u32) -> ExportLimits {
    ExportLimits {
        alignment,
        ..limits()
    }
}

fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        handle: 0xdead_beef_cafe_f00d,
        offset,
        length,
    }
}

fn reject(error: NbdError, payload_to_discard: u32) -> Validated {
    Validated::Reject {
        error,
        payload_to_discard,
    }
}

fn check(kind: u16, flags: u16, offset: u64, length: u32, limits: &ExportLimits) -> Validated {
    let header = header(kind, flags, offset, length);
    let verdict = validate(&header, limits);
    crate::fuzzing::check_verdict(&header, limits, &verdict);
    verdict
}

#[test]
fn request_header_layout_matches_the_spec() {
    let header = RequestHeader {
        flags: 0x0102,
        kind: 0x0304,
        handle: 0x0506_0708_090a_0b0c,
        offset: 0x0d0e_0f10_1112_1314,
        length: 0x1516_1718,
    };
    let bytes = encode_request_header(&header);
    let mut expected = vec![0x25, 0x60, 0x95, 0x13];
    expected.extend(1u8..=0x18);
    assert_eq!(bytes.to_vec(), expected);
    assert_eq!(decode_request_header(&bytes), Ok(header));
}

#[test]
fn request_with_bad_magic_is_an_error() {
    let mut bytes = encode_request_header(&header(NBD_CMD_READ, 0, 0, 512));
    bytes[0] = 0x12;
    assert_eq!(
        decode_request_header(&bytes),
        Err(HeaderError::BadMagic(0x1260_9513))
    );
    assert_eq!(
        HeaderError::BadMagic(0x1260_9513).to_string(),
        "bad magic 0x12609513"
    );
}

#[test]
fn simple_reply_echoes_all_64_bits_of_the_handle() {
    let handle = 0xfedc_ba98_7654_3210;
    let bytes = encode_simple_reply(handle, None);
    let mut expected = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
    expected.extend_from_slice(&handle.to_be_bytes());
    assert_eq!(bytes.to_vec(), expected);
    assert_eq!(decode_simple_reply(&bytes), Ok((handle, 0)));
    for error in NbdError::ALL {
        let bytes = encode_simple_reply(handle, Some(error));
        assert_eq!(decode_simple_reply(&bytes), Ok((handle, error.errno())));
    }
}

#[test]
fn simple_reply_with_bad_magic_is_an_error() {
    let mut bytes = encode_simple_reply(1, None);
    bytes[3] = 0;
    assert_eq!(
        decode_simple_reply(&bytes),
        Err(HeaderError::BadMagic(0x6744_6600))
    );
}

#[test]
fn ordinary_requests_are_accepted() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_READ, 0, 4096, 512, &l),
        Validated::Accept(Command::Read {
            offset: 4096,
            length: 512
        })
    );
    assert_eq!(
        check(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 4096, &l),
        Validated::Accept(Command::Write {
            offset: 0,
            length: 4096,
            fua: true
        })
    );
    assert_eq!(
        check(NBD_CMD_TRIM, 0, 0, 8192, &l),
        Validated::Accept(Command::Trim {
            offset: 0,
            length: 8192,
            fua: false
        })
    );
    assert_eq!(
        check(
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            512,
            512,
            &l
        ),
        Validated::Accept(Command::WriteZeroes {
            offset: 512,
            length: 512,
            fua: false,
            no_hole: true,
            fast_zero: true
        })
    );
    assert_eq!(
        check(NBD_CMD_CACHE, 0, 0, 4096, &l),
        Validated::Accept(Command::Cache {
            offset: 0,
            length: 4096
        })
    );
}

#[test]
fn request_ending_exactly_at_the_end_is_accepted() {
    assert!(matches!(
        check(NBD_CMD_READ, 0, SIZE - 512, 512, &limits()),
        Validated::Accept(_)
    ));
    assert!(matches!(
        check(NBD_CMD_WRITE, 0, SIZE - 1, 1, &limits()),
        Validated::Accept(_)
    ));
}

#[test]
fn flush_and_disc_ignore_offset_and_length() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_FLUSH, 0, u64::MAX, u32::MAX, &l),
        Validated::Accept(Command::Flush)
    );
    assert_eq!(
        check(NBD_CMD_DISC, 0, u64::MAX, u32::MAX, &l),
        Validated::Accept(Command::Disconnect)
    );
    assert_eq!(
        check(NBD_CMD_FLUSH, 0, 0, 0, &read_only()),
        Validated::Accept(Command::Flush)
    );
}

#[test]
fn disc_is_accepted_whatever_its_flags() {
    assert_eq!(
        check(NBD_CMD_DISC, 0xffff, 0, 0, &limits()),
        Validated::Accept(Command::Disconnect)
    );
}

#[test]
fn fua_is_accepted_on_every_command() {
    let l = limits();
    for kind in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_FLUSH,
        NBD_CMD_TRIM,
        NBD_CMD_CACHE,
        NBD_CMD_WRITE_ZEROES,
    ] {
        assert!(
            matches!(
                check(kind, NBD_CMD_FLAG_FUA, 0, 512, &l),
                Validated::Accept(_)
            ),
            "kind {kind}"
        );
    }
}

#[test]
fn df_and_req_one_are_ignored() {
    let l = limits();
    let flags = NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE;
    assert_eq!(
        check(NBD_CMD_READ, flags, 0, 512, &l),
        Validated::Accept(Command::Read {
            offset: 0,
            length: 512
        })
    );
    assert!(matches!(
        check(NBD_CMD_WRITE, flags, 0, 512, &l),
        Validated::Accept(_)
    ));
}

#[test]
fn unknown_command_types_are_einval_with_nothing_to_discard() {
    for kind in [NBD_CMD_BLOCK_STATUS, NBD_CMD_RESIZE, 9, 0x1234, u16::MAX] {
        assert_eq!(
            check(kind, 0, 0, 4096, &limits()),
            reject(NbdError::Inval, 0)
        );
    }
}

#[test]
fn unknown_and_extended_flags_are_einval() {
    let l = limits();
    for flags in [NBD_CMD_FLAG_PAYLOAD_LEN, 1 << 6, 1 << 15, 0xffff] {
        assert_eq!(
            check(NBD_CMD_READ, flags, 0, 512, &l),
            reject(NbdError::Inval, 0)
        );
        assert_eq!(
            check(NBD_CMD_FLUSH, flags, 0, 0, &l),
            reject(NbdError::Inval, 0)
        );
        assert_eq!(
            check(NBD_CMD_WRITE, flags, 0, 512, &l),
            reject(NbdError::Inval, 512),
            "a rejected WRITE still has its payload on the wire"
        );
    }
}

#[test]
fn write_zeroes_flags_on_other_commands_are_einval() {
    let l = limits();
    for flags in [NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_FAST_ZERO] {
        assert_eq!(
            check(NBD_CMD_READ, flags, 0, 512, &l),
            reject(NbdError::Inval, 0)
        );
        assert_eq!(
            check(NBD_CMD_TRIM, flags, 0, 512, &l),
            reject(NbdError::Inval, 0)
        );
        assert_eq!(
            check(NBD_CMD_WRITE, flags, 0, 512, &l),
            reject(NbdError::Inval, 512)
        );
    }
}

#[test]
fn read_past_the_end_is_einval() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_READ, 0, SIZE, 1, &l),
        reject(NbdError::Inval, 0)
    );
    assert_eq!(
        check(NBD_CMD_READ, 0, SIZE - 511, 512, &l),
        reject(NbdError::Inval, 0)
    );
    assert_eq!(
        check(NBD_CMD_READ, 0, u64::MAX - 10, 512, &l),
        reject(NbdError::Inval, 0),
        "offset + length overflows"
    );
}

#[test]
fn write_past_the_end_is_enospc_and_discards_the_payload() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_WRITE, 0, SIZE, 512, &l),
        reject(NbdError::NoSpc, 512)
    );
    assert_eq!(
        check(NBD_CMD_WRITE, 0, u64::MAX, 4096, &l),
        reject(NbdError::NoSpc, 4096)
    );
}

#[test]
fn write_zeroes_past_the_end_is_enospc() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_WRITE_ZEROES, 0, SIZE, 512, &l),
        reject(NbdError::NoSpc, 0)
    );
    assert_eq!(
        check(NBD_CMD_WRITE_ZEROES, 0, u64::MAX, 512, &l),
        reject(NbdError::NoSpc, 0)
    );
}

#[test]
fn trim_past_the_end_is_einval_as_the_spec_says() {
    // doc/proto.md, "Error values": "It SHOULD return NBD_EINVAL if it receives a read or
    // trim request including one or more sectors beyond the size of the device".
    let l = limits();
    assert_eq!(
        check(NBD_CMD_TRIM, 0, SIZE, 512, &l),
        reject(NbdError::Inval, 0)
    );
    assert_eq!(
        check(NBD_CMD_TRIM, 0, u64::MAX, 512, &l),
        reject(NbdError::Inval, 0)
    );
}

#[test]
fn cache_past_the_end_is_einval() {
    assert_eq!(
        check(NBD_CMD_CACHE, 0, SIZE, 512, &limits()),
        reject(NbdError::Inval, 0)
    );
}

#[test]
fn writes_on_a_read_only_export_are_eperm() {
    let l = read_only();
    assert_eq!(
        check(NBD_CMD_WRITE, 0, 0, 512, &l),
        reject(NbdError::Perm, 512)
    );
    assert_eq!(
        check(NBD_CMD_TRIM, 0, 0, 512, &l),
        reject(NbdError::Perm, 0)
    );
    assert_eq!(
        check(NBD_CMD_WRITE_ZEROES, 0, 0, 512, &l),
        reject(NbdError::Perm, 0)
    );
    assert!(matches!(
        check(NBD_CMD_READ, 0, 0, 512, &l),
        Validated::Accept(_)
    ));
    assert!(matches!(
        check(NBD_CMD_CACHE, 0, 0, 512, &l),
        Validated::Accept(_)
    ));
}

#[test]
fn read_and_write_over_max_payload_are_einval() {
    let l = limits();
    let too_long = l.max_payload + 1;
    assert_eq!(
        check(NBD_CMD_READ, 0, 0, too_long, &l),
        reject(NbdError::Inval, 0)
    );
    assert_eq!(
        check(NBD_CMD_WRITE, 0, 0, too_long, &l),
        reject(NbdError::Inval, too_long)
    );
    assert!(matches!(
        check(NBD_CMD_READ, 0, 0, l.max_payload, &l),
        Validated::Accept(_)
    ));
}

#[test]
fn trim_and_write_zeroes_are_never_rejected_for_size() {
    // The kernel sends discards of almost 4 GiB; they carry no payload.
    let l = ExportLimits {
        size_bytes: 1 << 40,
        ..limits()
    };
    let huge = u32::MAX;
    assert!(matches!(
        check(NBD_CMD_TRIM, 0, 0, huge, &l),
        Validated::Accept(_)
    ));
    assert!(matches!(
        check(NBD_CMD_WRITE_ZEROES, 0, 0, huge, &l),
        Validated::Accept(_)
    ));
}

#[test]
fn misaligned_requests_are_einval() {
    let l = aligned(512);
    for kind in [
        NBD_CMD_READ,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_CACHE,
    ] {
        assert_eq!(
            check(kind, 0, 256, 512, &l),
            reject(NbdError::Inval, 0),
            "kind {kind}"
        );
        assert_eq!(
            check(kind, 0, 512, 100, &l),
            reject(NbdError::Inval, 0),
            "kind {kind}"
        );
        assert!(matches!(
            check(kind, 0, 1024, 4096, &l),
            Validated::Accept(_)
        ));
    }
    assert_eq!(
        check(NBD_CMD_WRITE, 0, 1, 512, &l),
        reject(NbdError::Inval, 512)
    );
    assert_eq!(
        check(NBD_CMD_WRITE, 0, 512, 513, &l),
        reject(NbdError::Inval, 513)
    );
}

#[test]
fn alignment_of_zero_or_one_accepts_any_offset() {
    for alignment in [0, 1] {
        assert!(matches!(
            check(NBD_CMD_READ, 0, 3, 7, &aligned(alignment)),
            Validated::Accept(_)
        ));
    }
}

#[test]
fn zero_length_requests_inside_the_export_are_accepted() {
    // The spec leaves a server's behaviour unspecified but says it SHOULD NOT disconnect;
    // pairbd accepts them as no-ops, including at offset == size.
    let l = aligned(512);
    for kind in [
        NBD_CMD_READ,
        NBD_CMD_WRITE,
        NBD_CMD_TRIM,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_CACHE,
    ] {
        assert!(
            matches!(check(kind, 0, 0, 0, &l), Validated::Accept(_)),
            "kind {kind}"
        );
        assert!(
            matches!(check(kind, 0, SIZE, 0, &l), Validated::Accept(_)),
            "kind {kind}"
        );
    }
}

#[test]
fn zero_length_requests_past_the_end_get_the_out_of_range_error() {
    let l = limits();
    assert_eq!(
        check(NBD_CMD_READ, 0, SIZE + 1, 0, &l),
        reject(NbdError::Inval, 0)
    );
    assert_eq!(
        check(NBD_CMD_WRITE, 0, SIZE + 1, 0, &l),
        reject(NbdError::NoSpc, 0)
    );
}

#[test]
fn read_only_is_checked_before_bounds_and_size() {
    let l = read_only();
    assert_eq!(
        check(NBD_CMD_WRITE, 0, SIZE, u32::MAX, &l),
        reject(NbdError::Perm, u32::MAX)
    );
}
