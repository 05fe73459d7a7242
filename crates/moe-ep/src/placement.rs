//! Expert placement resolved for a world size: which rank owns each expert and its local index.

use crate::config::PlacementSpec;
use crate::error::{EpError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    world: usize,
    rank_of: Vec<usize>,
    local_index: Vec<usize>,
    /// experts_of[r] = global ids of rank r's experts, ascending (local index = position).
    experts_of: Vec<Vec<usize>>,
}

impl Placement {
    pub fn new(spec: &PlacementSpec, num_experts: usize, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(EpError::Group {
                arg: "world",
                expected: "at least 1 rank".into(),
                actual: "0".into(),
            });
        }
        let rank_of: Vec<usize> = match spec {
            PlacementSpec::Contiguous => {
                if num_experts % world != 0 {
                    return Err(EpError::InvalidConfig {
                        field: "num_experts",
                        expected: format!("a multiple of world = {world} for contiguous placement"),
                        actual: num_experts.to_string(),
                    });
                }
                let per_rank = num_experts / world;
                (0..num_experts).map(|e| e / per_rank).collect()
            }
            PlacementSpec::Table(table) => {
                if table.len() != num_experts {
                    return Err(EpError::InvalidConfig {
                        field: "placement",
                        expected: format!("a table of num_experts = {num_experts} entries"),
                        actual: format!("{} entries", table.len()),
                    });
                }
                if let Some((e, &r)) = table.iter().enumerate().find(|(_, &r)| r >= world) {
                    return Err(EpError::InvalidConfig {
                        field: "placement",
                        expected: format!("ranks in [0, {world})"),
                        actual: format!("expert {e} on rank {r}"),
                    });
                }
                table.clone()
            }
        };
        let mut experts_of = vec![Vec::new(); world];
        let mut local_index = vec![0; num_experts];
        for (e, &r) in rank_of.iter().enumerate() {
            local_index[e] = experts_of[r].len();
            experts_of[r].push(e);
        }
        Ok(Placement {
            world,
            rank_of,
            local_index,
            experts_of,
        })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn num_experts(&self) -> usize {
        self.rank_of.len()
    }

    /// The rank owning global expert `e`.
    pub fn rank_of(&self, e: usize) -> usize {
        self.rank_of[e]
    }

    /// Index of expert `e` among its rank's experts.
    pub fn local_index(&self, e: usize) -> usize {
        self.local_index[e]
    }

    /// E_local(r): how many experts rank `r` owns.
    pub fn num_local(&self, rank: usize) -> usize {
        self.experts_of[rank].len()
    }

    /// Global ids of rank `r`'s experts, in local order.
    pub fn experts_of(&self, rank: usize) -> &[usize] {
        &self.experts_of[rank]
    }

    /// The whole expert-to-rank table.
    pub fn table(&self) -> &[usize] {
        &self.rank_of
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous() {
        let p = Placement::new(&PlacementSpec::Contiguous, 8, 4).unwrap();
        assert_eq!(p.rank_of(5), 2);
        assert_eq!(p.local_index(5), 1);
        assert_eq!(p.experts_of(3), &[6, 7]);
        assert!(matches!(
            Placement::new(&PlacementSpec::Contiguous, 6, 4),
            Err(EpError::InvalidConfig {
                field: "num_experts",
                ..
            })
        ));
    }

    #[test]
    fn table_with_an_empty_rank() {
        let p = Placement::new(&PlacementSpec::Table(vec![1, 0, 1, 1]), 4, 3).unwrap();
        assert_eq!(p.experts_of(1), &[0, 2, 3]);
        assert_eq!(p.local_index(3), 2);
        assert_eq!(p.num_local(2), 0);
        assert!(Placement::new(&PlacementSpec::Table(vec![0, 3]), 2, 3).is_err());
    }
}
