//! Weighted round robin as a sequence: the agent writes one period of nginx's smooth weighted
//! round robin into the listener's ring slice and the datapath walks it with a per-CPU cursor.
//! Smooth means a heavy backend's turns are spread out, not bunched.

/// One period of the sequence (indices into `weights`), at most `max_len` long: weights are
/// reduced by their common divisor and, if the period is still too long, scaled down (every
/// positive weight keeps at least one turn). Empty when no weight is positive.
pub fn sequence(weights: &[u32], max_len: u32) -> Vec<u32> {
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let mut w: Vec<u64> = weights.iter().map(|&x| (x / g) as u64).collect();
    let total: u64 = w.iter().sum();
    if total > max_len as u64 {
        for x in w.iter_mut().filter(|x| **x > 0) {
            *x = (*x * max_len as u64 / total).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    (0..total)
        .map(|_| {
            for (c, x) in current.iter_mut().zip(&w) {
                *c += *x as i64;
            }
            let (pick, _) = current
                .iter()
                .enumerate()
                .filter(|(i, _)| w[*i] > 0)
                .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                .expect("a positive weight exists");
            current[pick] -= total;
            pick as u32
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests;
