import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { SHARED_GPU, SHARED_MODELS, SINGLE_MODEL, sharedModel } from '../fleet.js'
import { SimulatorProcess, generate, merged, type Run } from '../gateway-fleet.js'
import { percentile, type Target } from '../load.js'
import { scriptSummary, scriptText, type ScriptWork } from '../redis-work.js'
import { stopProcess } from '../processes.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'

const GOALS = { sharedGpuRatio: 0.8 }

export const scenario: Scenario = {
  letter: 'j',
  name: '1,000 models on one GPU',
  measures: 'handoffs/s and Redis script time per call: one server with 1,000 models (1,000 assignments) vs 1 model',
  goal: '≥ 0.8× the single model',
  fleet: 'cold',
  run: async (ctx) => {
    const fleet = ctx.fleet!
    const { lines, goals, summary } = ctx.report
    const { windowMs } = ctx
    const measure = fleet.measure.bind(fleet)
    const { dir } = ctx
    process.stderr.write(`bench: (j) ${SHARED_MODELS} models on one GPU vs 1, ${SHARED_MODELS} clients\n`)
    const shared = await SimulatorProcess.start('shared')
    const jDir = join(dir, 'j')
    await mkdir(jDir)
    let jGateway: Awaited<ReturnType<typeof fleet.startGateway>> | undefined
    try {
      jGateway = await fleet.startGateway(jDir, shared.ports, 'shared')
      const target = (model: string): Target => ({
        url: new URL(jGateway!.url + '/api/generate'),
        body: JSON.stringify({ model, prompt: 'Why is the sky blue?', stream: false })
      })
      // one client per model on the shared server; as many on the single model
      const many = Array.from({ length: SHARED_MODELS }, (_, i) => target(sharedModel(i)))
      const one = Array.from({ length: SHARED_MODELS }, () => target(SINGLE_MODEL))
      // (the first run also warms this gateway and registers its candidate lists)
      const runs: { one: Run[], many: Run[] } = { one: [], many: [] }
      for (let r = 0; r < 2; r++) {
        runs.one.push(await measure(one, { warmupMs: r === 0 ? 2000 : 1000, durationMs: windowMs / 2 }))
        runs.many.push(await measure(many, { warmupMs: r === 0 ? 2000 : 1000, durationMs: windowMs / 2 }))
      }
      const report = await shared.ask<'report'>({ type: 'report', gpuId: SHARED_GPU })
      if (report.overlaps > 0) throw new Error(`${report.overlaps} GPU overlaps in (j): two requests were on one GPU at once`)
      const o = merged(runs.one)
      const m = merged(runs.many)
      const ratio = m.requestsPerSecond / o.requestsPerSecond
      const usPerScript = (w: ScriptWork): number => w.scriptUs / w.scripts
      summary.j = {
        models: SHARED_MODELS,
        oneAssignment: { rps: Math.round(o.requestsPerSecond), p99Ms: +fmt(percentile(o.latencies, 99)), redis: scriptSummary(o.redis, o.completed) },
        sharedAssignments: { rps: Math.round(m.requestsPerSecond), p99Ms: +fmt(percentile(m.latencies, 99)), redis: scriptSummary(m.redis, m.completed) },
        ratio: +fmt(ratio)
      }
      lines.push(
        `(j) one GPU, ${SHARED_MODELS} clients through the gateway: one server serving 1 model (1 assignment) vs ${SHARED_MODELS} models (${SHARED_MODELS} assignments, one client each)`,
        `  handoffs/s  1 assignment ${Math.round(o.requestsPerSecond)}  ${SHARED_MODELS} assignments ${Math.round(m.requestsPerSecond)} (${fmt(ratio)}×)`,
        `  Redis script time per call  1 assignment ${fmt(usPerScript(o.redis), 0)} µs  ${SHARED_MODELS} assignments ${fmt(usPerScript(m.redis), 0)} µs`,
        `  1 assignment: ${scriptText(o.redis, o.completed)}`,
        `  ${SHARED_MODELS} assignments: ${scriptText(m.redis, m.completed)}`,
        ''
      )
      goals.push({ goal: `${SHARED_MODELS} models on one GPU vs 1, handoffs/s (j)`, target: `≥ ${GOALS.sharedGpuRatio}×`, reached: `${fmt(ratio)}×`, pass: ratio >= GOALS.sharedGpuRatio })
    } finally {
      if (jGateway != null) await stopProcess(jGateway.child)
      await shared.close()
    }
  }
}
