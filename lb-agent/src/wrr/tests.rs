use super::*;

fn counts(seq: &[u32], n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    seq.iter().for_each(|&i| c[i as usize] += 1);
    c
}

#[test]
fn turns_match_weights_exactly() {
    let s = sequence(&[1, 2, 3], 65537);
    assert_eq!(s.len(), 6);
    assert_eq!(counts(&s, 3), [1, 2, 3]);
    // Common divisors are removed: the same period as 1:2:3.
    assert_eq!(sequence(&[10, 20, 30], 65537), s);
}

#[test]
fn equal_weights_alternate_and_heavy_backends_are_spread() {
    assert_eq!(sequence(&[1, 1, 1], 100), [0, 1, 2]);
    // nginx's example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c.
    assert_eq!(sequence(&[5, 1, 1], 100), [0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn zero_weights_get_no_turn_and_all_zero_is_empty() {
    assert!(!sequence(&[2, 0, 1], 100).contains(&1));
    assert!(sequence(&[0, 0], 100).is_empty());
    assert!(sequence(&[], 100).is_empty());
}

#[test]
fn long_periods_are_scaled_to_fit() {
    let s = sequence(&[65535, 65534, 1], 1000);
    assert!(s.len() <= 1002, "{}", s.len());
    let c = counts(&s, 3);
    assert!(c[2] >= 1, "a positive weight keeps a turn");
    assert!((c[0] as i64 - c[1] as i64).abs() <= 1);
}
