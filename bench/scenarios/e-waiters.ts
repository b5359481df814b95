import { compareEngineCases } from '../engine.js'
import type { Scenario } from '../scenario.js'

export const scenario: Scenario = {
  letter: 'e',
  name: '1,000 waiters',
  measures: 'the lease engine alone: one GPU with 1,000 waiters vs 16, and 1,000 waiters in 1,000 queues vs one',
  goal: '≥ 0.8× each',
  run: async (ctx) => {
    process.stderr.write('bench: (e) one GPU, 1,000 waiters vs 16; 1,000 queues vs one\n')
    await compareEngineCases(ctx, 'e', 'one GPU, 16 → 1,000 waiters',
      { candidates: 1, free: 1, clients: 16, queues: 1 }, { candidates: 1, free: 1, clients: 1000, queues: 1 })
    await compareEngineCases(ctx, 'e2', 'one GPU, 1,000 waiters in 1 → 1,000 queues',
      { candidates: 1, free: 1, clients: 1000, queues: 1 }, { candidates: 1, free: 1, clients: 1000, queues: 1000 })
    ctx.report.lines.push('')
  }
}
