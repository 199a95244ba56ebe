use super::*;

#[test]
fn an_ipv4_flow_key_narrows_and_widens_back_unchanged() {
    let k = FlowKey {
        src_be: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
        dst_be: [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0],
        sport_be: 40000u16.to_be(),
        dport_be: 443u16.to_be(),
        proto: PROTO_UDP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    let narrow = k.v4();
    assert_eq!(narrow.src_be, k.src_be[0]);
    assert_eq!(narrow.dst_be, k.dst_be[0]);
    assert_eq!(
        (narrow.sport_be, narrow.dport_be, narrow.proto),
        (k.sport_be, k.dport_be, k.proto)
    );
    assert_eq!(narrow.widen(), k);
    // Another protocol on the same ports is another flow.
    assert_ne!(
        FlowKey {
            proto: PROTO_TCP,
            ..k
        }
        .v4(),
        narrow
    );
}
