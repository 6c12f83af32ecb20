//! Keeping candle's tensor ids unique when the crate runs inside evcxr.
//!
//! candle numbers tensors from a process-wide counter, and its backward pass keys gradients by
//! that number. evcxr links dependencies statically into every notebook cell, so each cell has
//! its own copy of the counter, starting at 1: a tensor made in one cell can share its id with
//! one made in another, and a backward pass mixing them adds unrelated gradients (a "shape
//! mismatch in add", or silently wrong numbers). Before building a graph over long-lived
//! tensors (weights, adapters), the entry points below move this copy's counter past the ids
//! those tensors already hold. Outside notebooks the counter is already past them and this
//! costs one tiny allocation.

use candle_core::{Device, Tensor};

/// The number candle gave `t` (read from `TensorId`'s `Debug`, its only public view).
pub fn tensor_id_value(t: &Tensor) -> usize {
    let text = format!("{:?}", t.id());
    text.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or(0)
}

/// The largest id among `tensors`.
pub fn max_id<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    tensors.into_iter().map(tensor_id_value).max().unwrap_or(0)
}

/// Makes every tensor this copy of candle creates from now on get an id above `floor`.
pub fn reserve_ids_above(floor: usize) {
    let probe = Tensor::zeros((), candle_core::DType::U8, &Device::Cpu).expect("scalar on CPU");
    let current = tensor_id_value(&probe);
    // Each view gets a fresh id without copying data.
    for _ in current..=floor {
        let _ = probe.unsqueeze(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserving_moves_the_counter_past_the_floor() {
        let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        let floor = tensor_id_value(&t) + 5000;
        reserve_ids_above(floor);
        let next = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(tensor_id_value(&next) > floor);
        assert!(tensor_id_value(&t) > 0, "ids are readable");
    }
}
