/**
 * (h) shared multi-model servers (Scheduler v3, CONTRACT 16.5): 4 servers assigned `*`, one model
 * resident at a time (OLLAMA_MAX_LOADED_MODELS 1), 1.5 s per load; 3 models asked for 60/30/10 %
 * of the time by 16 closed-loop clients. A balancer that ignores which model a server holds makes
 * it load one model after another.
 */
import { percentile } from '../load.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'
import { CONTENDERS, runContender, seeded, streamChat, tagged, words, type ContenderRun, type Route, type SchedulingContext } from '../scheduling.js'

export const H = {
  servers: 4,
  models: ['shared-a', 'shared-b', 'shared-c'],
  popularity: [0.6, 0.3, 0.1],
  clients: 16,
  promptTokens: 100,
  cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 2, slots: 1, loadMs: 1500, maxLoadedModels: 1 },
  answerTokens: 16,
  goals: { loadsRatio: 0.25, ttftP90Ratio: 0.5 }
}

/** How long the clients send, from cold: loads take 1.5 s, so at least 6 s. */
const durationMs = (windowMs: number): number => Math.max(6000, 2.5 * windowMs)

interface ClosedLoopResult {
  ttfts: number[]
  requests: number
}

function pickModel (random: () => number): number {
  let x = random()
  for (let i = 0; i < H.popularity.length; i++) {
    if (x < H.popularity[i]) return i
    x -= H.popularity[i]
  }
  return H.popularity.length - 1
}

async function closedLoop (route: Route, ms: number): Promise<ClosedLoopResult> {
  const ttfts: number[] = []
  const deadline = performance.now() + ms
  await Promise.all(Array.from({ length: H.clients }, async (_, c) => {
    const random = seeded(2000 + c)
    while (performance.now() < deadline) {
      const model = pickModel(random)
      const answer = await streamChat(route(model), H.models[model], [{ role: 'user', content: tagged(`c${c}`, words(random, H.promptTokens)) }])
      ttfts.push(answer.ttftMs)
    }
  }))
  return { ttfts, requests: ttfts.length }
}

async function run (ctx: SchedulingContext): Promise<void> {
  const { lines, goals, summary } = ctx.report
  const ms = durationMs(ctx.windowMs)
  const runs: Array<ContenderRun<ClosedLoopResult>> = []
  for (const contender of CONTENDERS) {
    process.stderr.write(`bench: (h) shared multi-model servers, ${contender}\n`)
    runs.push(await runContender(ctx, 'h', contender,
      { servers: H.servers, models: H.models, cost: H.cost, tokens: H.answerTokens },
      { model: '*' },
      async (route) => await closedLoop(route, ms)))
  }
  const rows = runs.map((r) => ({
    contender: r.contender,
    requests: r.result.requests,
    loads: r.costs.loads,
    loadsPer100: r.costs.loads / r.result.requests * 100,
    ttftP50Ms: percentile(r.result.ttfts, 50),
    ttftP90Ms: percentile(r.result.ttfts, 90),
    ttftP99Ms: percentile(r.result.ttfts, 99)
  }))
  const byName = new Map(rows.map((r) => [r.contender, r]))
  const gateway = byName.get('gateway')!
  const nginx = [byName.get('nginx round-robin')!, byName.get('nginx least_conn')!]
  const betterLoads = Math.min(...nginx.map((r) => r.loadsPer100))
  const betterTtftP90 = Math.min(...nginx.map((r) => r.ttftP90Ms))
  summary.h = {
    servers: H.servers, models: H.models.length, popularity: H.popularity, clients: H.clients, seconds: ms / 1000, cost: H.cost,
    contenders: rows.map((r) => ({ ...r, loadsPer100: +fmt(r.loadsPer100, 1), ttftP50Ms: +fmt(r.ttftP50Ms, 1), ttftP90Ms: +fmt(r.ttftP90Ms, 1), ttftP99Ms: +fmt(r.ttftP99Ms, 1) }))
  }
  lines.push(
    `(h) shared multi-model servers: ${H.servers} servers assigned *, one model resident at a time, ${H.cost.loadMs / 1000} s loads; ${H.models.length} models at ${H.popularity.map((p) => Math.round(p * 100)).join('/')} %, ${H.clients} closed-loop clients for ${fmt(ms / 1000, 1)} s from cold`,
    '                        requests   loads   loads per 100   TTFT ms: p50      p90      p99',
    ...rows.map((r) => `  ${r.contender.padEnd(20)} ${String(r.requests).padStart(8)} ${String(r.loads).padStart(7)} ${fmt(r.loadsPer100, 1).padStart(15)} ${fmt(r.ttftP50Ms, 1).padStart(15)} ${fmt(r.ttftP90Ms, 1).padStart(8)} ${fmt(r.ttftP99Ms, 1).padStart(8)}`),
    '  (sticky: each model pinned to one server by the client, the reference: no loads after the first, no balancing)',
    ''
  )
  goals.push(
    { goal: 'shared servers, loads / better nginx (h)', target: `≤ ${H.goals.loadsRatio}×`, reached: `${fmt(gateway.loadsPer100 / betterLoads)}×`, pass: gateway.loadsPer100 / betterLoads <= H.goals.loadsRatio },
    { goal: 'shared servers, TTFT p90 / better nginx (h)', target: `≤ ${H.goals.ttftP90Ratio}×`, reached: `${fmt(gateway.ttftP90Ms / betterTtftP90)}×`, pass: gateway.ttftP90Ms / betterTtftP90 <= H.goals.ttftP90Ratio }
  )
}

export const scenario: Scenario = {
  letter: 'h',
  name: 'shared multi-model servers',
  measures: '4 servers assigned *, one model resident at a time, 1.5 s loads, 3 models at 60/30/10 %, 16 clients: loads per 100 requests, TTFT; same contenders',
  goal: 'loads ≤ 0.25×, TTFT p90 ≤ 0.5× better nginx',
  run
}
