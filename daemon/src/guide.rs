//! Steering a stack of one selection's candidates between epochs: successive
//! halving lets only the best go on at each rung, and a spent budget stops
//! every candidate, which keeps its best weights so far (like early stopping).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cerebro_shared::mst::SelectionPlan;

use crate::catalog::SelectionState;
use crate::train::{Control, EpochStats, TrainError, TrainedModel};

pub struct Guide {
    plan: SelectionPlan,
    deadline: Option<Instant>,
    epochs_left: Option<u64>,
    /// Per rung epoch, the best validation losses recorded there (candidates
    /// of earlier stacks, then this one's).
    rung_losses: BTreeMap<u32, Vec<f64>>,
    /// Each model's best validation loss so far.
    best: Vec<f64>,
    /// Why each model stopped before its own end, if it did.
    pub stopped: Vec<Option<String>>,
    /// The models halving stopped at a rung.
    halved: Vec<bool>,
}

impl Guide {
    /// A guide for `k` candidates starting `now` in a selection at `state`.
    pub fn new(state: SelectionState, k: usize, now: Instant) -> Guide {
        let deadline = state
            .plan
            .training_seconds()
            .map(|training| now + Duration::from_secs_f64((training - state.elapsed_seconds).max(0.0)));
        let epochs_left = state.plan.budget_epochs.map(|budget| budget.saturating_sub(state.epochs_spent));
        Guide {
            plan: state.plan,
            deadline,
            epochs_left,
            rung_losses: state.rung_losses,
            best: vec![f64::INFINITY; k],
            stopped: vec![None; k],
            halved: vec![false; k],
        }
    }

    fn budget_spent(&self, now: Instant) -> Option<String> {
        if self.epochs_left == Some(0) {
            let budget = self.plan.budget_epochs.unwrap_or(0);
            return Some(format!("the selection's budget of {budget} epochs was spent"));
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Some(self.time_spent());
        }
        None
    }

    fn time_spent(&self) -> String {
        let budget = self.plan.budget_seconds.unwrap_or(0.0);
        let training = self.plan.training_seconds().unwrap_or(0.0);
        format!("the selection's time for training, {training} s of its {budget} s budget, was spent")
    }

    /// Whether halving stopped model `m` at a rung: it lost to the
    /// selection's better candidates early.
    pub fn halved(&self, m: usize) -> bool {
        self.halved.get(m).copied().unwrap_or(false)
    }

    /// When training must stop, even within an epoch: the selection's time
    /// for training is spent.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Records why the models that the deadline cut short within an epoch
    /// stopped.
    pub fn note_interrupted(&mut self, models: &[Result<TrainedModel, TrainError>]) {
        for (m, model) in models.iter().enumerate() {
            let Ok(TrainedModel { interrupted: Some(epoch), .. }) = model else { continue };
            if self.stopped[m].is_none() {
                self.stopped[m] = Some(format!("{} (during epoch {epoch}, which was not kept)", self.time_spent()));
            }
        }
    }

    /// Why candidates about to start should not: the budget is already spent.
    pub fn exhausted(&self, now: Instant) -> Option<String> {
        self.budget_spent(now).map(|why| format!("{why} before this candidate started"))
    }

    /// Decides, after an epoch, which of the reporting models stop here.
    /// Controls already set (a cancel, a shutdown) are left as they are.
    pub fn steer(&mut self, reports: &[(usize, EpochStats)], controls: &mut [Control], now: Instant) {
        for (m, stats) in reports {
            self.best[*m] = self.best[*m].min(stats.valid_loss);
        }
        if let Some(left) = self.epochs_left.as_mut() {
            *left = left.saturating_sub(reports.len() as u64);
        }
        if let Some(why) = self.budget_spent(now) {
            for (m, stats) in reports {
                if controls[*m] == Control::Continue {
                    controls[*m] = Control::Finish;
                    self.stopped[*m] = Some(format!("{why} (after epoch {})", stats.epoch));
                }
            }
            return;
        }
        let Some(epoch) = reports.first().map(|(_, s)| s.epoch) else { return };
        let Some(rung) = self.plan.rungs.iter().position(|&r| r == epoch) else { return };
        let board = self.rung_losses.entry(epoch).or_default();
        board.extend(reports.iter().map(|(m, _)| self.best[*m]));
        let eta = self.plan.eta.unwrap_or(3);
        for (m, _) in reports {
            if controls[*m] == Control::Continue && !self.plan.survives(self.best[*m], board) {
                controls[*m] = Control::Finish;
                self.halved[*m] = true;
                self.stopped[*m] = Some(format!(
                    "halving: not in the best 1/{eta} at rung {} of {} (epoch {epoch}, {} candidates compared)",
                    rung + 1,
                    self.plan.rungs.len(),
                    board.len()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cerebro_shared::mst::Strategy;

    use super::*;

    fn state(plan: SelectionPlan) -> SelectionState {
        SelectionState { plan, elapsed_seconds: 0.0, epochs_spent: 0, rung_losses: BTreeMap::new() }
    }

    fn report(epoch: u32, losses: &[f64]) -> Vec<(usize, EpochStats)> {
        losses
            .iter()
            .enumerate()
            .map(|(m, &valid_loss)| (m, EpochStats { epoch, train_loss: valid_loss, valid_loss, seconds: 0.1 }))
            .collect()
    }

    #[test]
    fn halving_stops_all_but_the_best_third_at_a_rung() {
        let plan = SelectionPlan { strategy: Strategy::Halving, rungs: vec![2, 6], eta: Some(3), ..Default::default() };
        let mut earlier = state(plan);
        earlier.rung_losses.insert(2, vec![0.05]);
        let mut guide = Guide::new(earlier, 5, Instant::now());
        let mut controls = vec![Control::Continue; 5];
        guide.steer(&report(1, &[0.9, 0.1, 0.5, 0.3, 0.2]), &mut controls, Instant::now());
        assert!(controls.iter().all(|c| *c == Control::Continue), "no rung at epoch 1");
        // Best losses so far: the epoch-1 value is better than epoch 2 for model 0.
        controls[4] = Control::Drop;
        guide.steer(&report(2, &[0.95, 0.15, 0.4, 0.35, 0.25]), &mut controls, Instant::now());
        // Six compared (one earlier candidate at 0.05): ceil(6/3) = 2 go on: 0.05 and 0.1.
        assert_eq!(controls, vec![Control::Finish, Control::Continue, Control::Finish, Control::Finish, Control::Drop]);
        assert!(guide.stopped[0].as_deref().unwrap().contains("rung 1 of 2 (epoch 2, 6 candidates compared)"));
        assert_eq!((0..5).map(|m| guide.halved(m)).collect::<Vec<_>>(), [true, false, true, true, false]);
        assert_eq!(guide.stopped[4], None, "a cancel is left as it is");
    }

    #[test]
    fn budgets_stop_everyone_and_say_so() {
        let plan = SelectionPlan { strategy: Strategy::Grid, budget_epochs: Some(10), ..Default::default() };
        let mut spent = state(plan);
        spent.epochs_spent = 6;
        let mut guide = Guide::new(spent, 2, Instant::now());
        assert_eq!(guide.exhausted(Instant::now()), None);
        let mut controls = vec![Control::Continue; 2];
        guide.steer(&report(1, &[0.5, 0.4]), &mut controls, Instant::now());
        assert_eq!(controls, vec![Control::Continue; 2]);
        guide.steer(&report(2, &[0.5, 0.4]), &mut controls, Instant::now());
        assert_eq!(controls, vec![Control::Finish; 2]);
        assert_eq!(guide.stopped[1].as_deref(), Some("the selection's budget of 10 epochs was spent (after epoch 2)"));

        let plan = SelectionPlan { strategy: Strategy::Grid, budget_seconds: Some(60.0), ..Default::default() };
        let mut late = state(plan.clone());
        late.elapsed_seconds = 61.0;
        let guide = Guide::new(late, 1, Instant::now());
        assert!(guide.exhausted(Instant::now()).unwrap().contains("57 s of its 60 s budget"));

        // Training stops 3 s (5 %) before the budget ends.
        let mut near = state(plan);
        near.elapsed_seconds = 56.0;
        let now = Instant::now();
        let guide = Guide::new(near, 1, now);
        assert_eq!(guide.deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(guide.exhausted(now), None);
        let why = guide.exhausted(now + Duration::from_secs(1)).unwrap();
        assert_eq!(
            why,
            "the selection's time for training, 57 s of its 60 s budget, was spent before this candidate started"
        );
    }
}
