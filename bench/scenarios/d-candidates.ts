import { compareEngineCases } from '../engine.js'
import type { Scenario } from '../scenario.js'

export const scenario: Scenario = {
  letter: 'd',
  name: '2,048 candidates',
  measures: 'the lease engine alone (in this process, Redis): grants/s with 2,048 candidates (4 free) vs 64',
  goal: '≥ 0.8× the 64',
  run: async (ctx) => {
    process.stderr.write('bench: (d) 2,048 candidates vs 64\n')
    await compareEngineCases(ctx, 'd', '64 → 2,048 candidates, 4 free, 16 clients',
      { candidates: 64, free: 4, clients: 16, queues: 1 }, { candidates: 2048, free: 4, clients: 16, queues: 1 })
  }
}
