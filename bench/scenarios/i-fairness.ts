/**
 * (i) fairness (Scheduler v3, CONTRACT 16.5): two API keys keep one model's servers backlogged, one
 * of them with prompts 10× longer. Served tokens (prompt + answer, as the servers counted each
 * request, told apart by a tag in the prompt) should be shared about equally, not in proportion
 * to the prompts' lengths as a FIFO shares them.
 */
import type { CostReport } from '../cost-fleet.js'
import { sleep } from '../load.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'
import { runContender, seeded, streamChat, tagged, words, type ContenderRun, type Route, type SchedulingContext } from '../scheduling.js'

export const I = {
  servers: 2,
  model: 'fair',
  keys: [
    { name: 'short', apiKey: 'bench-key-short-prompts', promptTokens: 300 },
    { name: 'long', apiKey: 'bench-key-long-prompts', promptTokens: 3000 }
  ],
  clientsPerKey: 8,
  cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 2, slots: 1 },
  answerTokens: 16,
  warmupMs: 1000,
  goals: { shareRatio: 1.5 }
}

/** nginx cannot tell the keys apart: it stands for what a FIFO gives. */
const CONTENDERS = ['gateway', 'nginx round-robin'] as const

const windowOf = (windowMs: number): number => Math.max(4000, 2 * windowMs)

/** The requests each key sent, and what the servers began in the window (its report taken at the window's end). */
interface Backlog { requests: Record<string, number>, window: CostReport }

async function backlog (route: Route, ms: number, mark: () => Promise<void>, report: () => Promise<CostReport>): Promise<Backlog> {
  const requests: Record<string, number> = {}
  let stopping = false
  const clients = I.keys.flatMap((key, k) => Array.from({ length: I.clientsPerKey }, async (_, c) => {
    const random = seeded(3000 + k * 100 + c)
    while (!stopping) {
      await streamChat(route(k, key.apiKey), I.model, [{ role: 'user', content: tagged(key.name, words(random, key.promptTokens)) }])
      requests[key.name] = (requests[key.name] ?? 0) + 1
    }
  }))
  await sleep(I.warmupMs)
  await mark()
  await sleep(ms)
  // The window ends here, while both keys are still backlogged: the requests in flight and queued
  // now are served after it (8 of each key's, a long key's 10× the tokens), so they are not counted.
  const window = await report()
  stopping = true
  await Promise.all(clients)
  return { requests, window }
}

async function run (ctx: SchedulingContext): Promise<void> {
  const { lines, goals, summary } = ctx.report
  const ms = windowOf(ctx.windowMs)
  const runs: Array<ContenderRun<Backlog>> = []
  for (const contender of CONTENDERS) {
    process.stderr.write(`bench: (i) fairness, ${contender}\n`)
    runs.push(await runContender(ctx, 'i', contender,
      { servers: I.servers, models: [I.model], cost: I.cost, tokens: I.answerTokens },
      { model: I.model, apiKeys: I.keys.map((k) => k.apiKey) },
      async (route, fleet) => await backlog(route, ms, async () => await fleet.mark(), async () => await fleet.report())))
  }
  // Served in the window: the requests the servers began (got a slot for) between the mark and
  // the window's end, by key.
  const rows = runs.map((r) => {
    const tokens: Record<string, number> = Object.fromEntries(I.keys.map((k) => [k.name, 0]))
    const served: Record<string, number> = Object.fromEntries(I.keys.map((k) => [k.name, 0]))
    for (const rec of r.result.window.records) {
      if (rec.tag === undefined || !(rec.tag in tokens)) throw new Error(`(i) ${r.contender}: a request without its key's tag`)
      tokens[rec.tag] += rec.promptTokens + rec.evalCount
      served[rec.tag]++
    }
    const values = Object.values(tokens)
    const all = values.reduce((a, b) => a + b, 0)
    return { contender: r.contender, tokens, served, shares: Object.fromEntries(Object.entries(tokens).map(([k, v]) => [k, v / all])), ratio: Math.max(...values) / Math.min(...values) }
  })
  const gateway = rows.find((r) => r.contender === 'gateway')!
  summary.i = {
    servers: I.servers, keys: I.keys.map((k) => ({ name: k.name, promptTokens: k.promptTokens, clients: I.clientsPerKey })), seconds: ms / 1000,
    contenders: rows.map((r) => ({ ...r, shares: Object.fromEntries(Object.entries(r.shares).map(([k, v]) => [k, +fmt(v, 3)])), ratio: +fmt(r.ratio) }))
  }
  const [short, long] = I.keys
  lines.push(
    `(i) fairness: ${I.servers} servers of one model (1 slot each), two API keys with ${I.clientsPerKey} clients each, backlogged, prompts of ~${short.promptTokens} vs ~${long.promptTokens} tokens; tokens served in ${fmt(ms / 1000, 1)} s`,
    `                        requests ${short.name}/${long.name}   tokens ${short.name}          ${long.name}   share ${short.name}/${long.name}   larger / smaller`,
    ...rows.map((r) => `  ${r.contender.padEnd(20)} ${`${r.served[short.name]} / ${r.served[long.name]}`.padStart(19)} ${String(r.tokens[short.name]).padStart(12)} ${String(r.tokens[long.name]).padStart(12)} ${`${fmt(r.shares[short.name] * 100, 0)} / ${fmt(r.shares[long.name] * 100, 0)} %`.padStart(17)} ${`${fmt(r.ratio)}×`.padStart(18)}`),
    '  (nginx cannot tell the keys apart: it stands for a FIFO)',
    ''
  )
  goals.push({ goal: 'two keys, served token shares, larger / smaller (i)', target: `≤ ${I.goals.shareRatio}×`, reached: `${fmt(gateway.ratio)}×`, pass: gateway.ratio <= I.goals.shareRatio })
}

export const scenario: Scenario = {
  letter: 'i',
  name: 'fairness',
  measures: 'two API keys backlogged on one model, one with 10× longer prompts: served token shares',
  goal: 'shares within 1.5×',
  run
}
