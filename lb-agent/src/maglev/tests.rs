use super::*;

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            key: member_key(
                format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
                80,
            ),
            weight: 1,
        })
        .collect()
}

fn shares(table: &[u32], n: usize) -> Vec<f64> {
    let mut c = vec![0usize; n];
    for &s in table {
        c[s as usize] += 1;
    }
    c.iter().map(|&x| x as f64 / table.len() as f64).collect()
}

#[test]
fn an_empty_set_gives_an_empty_table() {
    assert!(build(&[], DEFAULT_TABLE_SIZE).is_empty());
    let drained = [Member { key: 1, weight: 0 }, Member { key: 2, weight: 0 }];
    assert!(build(&drained, DEFAULT_TABLE_SIZE).is_empty());
}

#[test]
fn one_backend_takes_every_slot() {
    let t = build(&members(1), DEFAULT_TABLE_SIZE);
    assert_eq!(t.len(), DEFAULT_TABLE_SIZE as usize);
    assert!(t.iter().all(|&s| s == 0));
}

#[test]
fn the_table_is_deterministic_and_full() {
    let m = members(7);
    let a = build(&m, DEFAULT_TABLE_SIZE);
    assert_eq!(a, build(&m, DEFAULT_TABLE_SIZE));
    assert!(a.iter().all(|&s| (s as usize) < m.len()));
}

#[test]
fn equal_weights_share_evenly_and_weights_are_respected_within_5_percent() {
    let n = 10;
    for s in shares(&build(&members(n), DEFAULT_TABLE_SIZE), n) {
        assert!((s - 0.1).abs() < 0.1 * 0.05, "share {s}");
    }
    let mut m = members(4);
    for (i, b) in m.iter_mut().enumerate() {
        b.weight = [1, 2, 3, 4][i];
    }
    let total: u32 = m.iter().map(|b| b.weight).sum();
    let sh = shares(&build(&m, DEFAULT_TABLE_SIZE), 4);
    for (b, s) in m.iter().zip(sh) {
        let want = b.weight as f64 / total as f64;
        assert!(
            (s - want).abs() <= want * 0.05,
            "weight {} share {s} want {want}",
            b.weight
        );
    }
}

#[test]
fn a_zero_weight_backend_gets_no_slot() {
    let mut m = members(3);
    m[1].weight = 0;
    assert!(!build(&m, DEFAULT_TABLE_SIZE).contains(&1));
}

#[test]
fn removing_one_of_n_backends_moves_about_one_nth_of_keys() {
    for n in [3usize, 10, 50] {
        let m = members(n);
        let before = build(&m, DEFAULT_TABLE_SIZE);
        let removed = n / 2;
        let mut rest = m.clone();
        rest.remove(removed);
        let after = build(&rest, DEFAULT_TABLE_SIZE);
        // Map `after` indices back to the original members.
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(&b, &a)| {
                let a = if (a as usize) >= removed { a + 1 } else { a };
                b != a
            })
            .count();
        let frac = moved as f64 / before.len() as f64;
        assert!(
            frac <= 1.0 / n as f64 + 0.01,
            "n={n}: {frac} of slots moved"
        );
    }
}

#[test]
fn a_smaller_prime_table_works() {
    let t = build(&members(3), 251);
    assert_eq!(t.len(), 251);
    assert!(t.iter().all(|&s| s < 3));
}
