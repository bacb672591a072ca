"""Record the launches of a module's Triton kernel: grid and keyword (constexpr / config) arguments.

``spy_launches(monkeypatch, module, "_kernel", run=False)`` replaces ``module._kernel`` for the test;
``kernel[grid](...)`` then records the launch and, with ``run=True``, launches the real kernel. With
``run=False`` nothing runs (outputs stay as allocated): the launch geometry of inputs far too large for
the interpreter can still be checked on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CUDA's grid limits: axis 0 up to 2**31 - 1 blocks, axes 1 and 2 up to 65535.
MAX_GRID_AXIS_0 = 2**31 - 1
MAX_GRID_AXIS_1_2 = 65535


@dataclass
class Launch:
    grid: object  # a tuple, or a callable of the config's meta-parameters (autotuned kernels)
    kwargs: dict

    def grids(self, configs=()) -> list[tuple[int, ...]]:
        """The grid as launched: one tuple, or one per autotuner config for a callable grid."""
        if not callable(self.grid):
            return [tuple(self.grid)]
        return [tuple(self.grid({**self.kwargs, **config.kwargs})) for config in configs]


@dataclass
class LaunchSpy:
    kernel: object
    run: bool
    launches: list[Launch] = field(default_factory=list)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(grid, kwargs))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch

    @property
    def configs(self) -> list:
        """The autotuner's configs (empty for a plain ``triton.jit`` kernel)."""
        return list(getattr(self.kernel, "configs", []))

    def grids(self) -> list[tuple[int, ...]]:
        return [grid for launch in self.launches for grid in launch.grids(self.configs)]


def spy_launches(monkeypatch, module, name: str, *, run: bool = True) -> LaunchSpy:
    spy = LaunchSpy(getattr(module, name), run)
    monkeypatch.setattr(module, name, spy)
    return spy


def assert_grid_fits_cuda(grid: tuple[int, ...]) -> None:
    assert 1 <= len(grid) <= 3, grid
    assert 1 <= grid[0] <= MAX_GRID_AXIS_0, f"grid {grid}: axis 0 past {MAX_GRID_AXIS_0}"
    assert all(1 <= g <= MAX_GRID_AXIS_1_2 for g in grid[1:]), f"grid {grid}: axis 1 or 2 past {MAX_GRID_AXIS_1_2}"
