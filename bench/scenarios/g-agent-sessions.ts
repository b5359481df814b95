/**
 * (g) agent sessions (Scheduler v3, CONTRACT 16.5): 4 servers of one model, each with 1 slot and 4
 * cached prompt states (its slot's and 3 in RAM), prefill 0.05 ms per uncached token; 12 sessions
 * at once of 6 turns, each with a system prompt of its own of ~6,000 tokens, ~200 tokens per user
 * turn and 50–250 ms of thinking (a tool call) between turns. Sessions stay warm only where their
 * last turn ran, so a balancer that ignores that recomputes the system prompt again and again.
 */
import type { Message } from 'ollama'
import { percentile, sleep } from '../load.js'
import { fmt } from '../report.js'
import type { Scenario } from '../scenario.js'
import { CONTENDERS, runContender, seeded, streamChat, tagged, words, type ContenderRun, type Route, type SchedulingContext } from '../scheduling.js'

export const G = {
  servers: 4,
  model: 'agent',
  sessions: 12,
  turns: 6,
  systemTokens: 6000,
  userTokens: 200,
  thinkMs: [50, 250] as const,
  cost: { prefillMsPerToken: 0.05, decodeMsPerToken: 2, slots: 1, ramCacheEntries: 3 },
  answerTokens: 16,
  goals: { ttftP90Ratio: 0.5, computedRatio: 1.3, workloadRatio: 1 }
}

interface SessionsResult {
  /** client-measured time to first token of turns 2–6, ms */
  laterTurnTtfts: number[]
  firstTurnTtfts: number[]
  workloadMs: number
}

async function sessions (route: Route): Promise<SessionsResult> {
  const laterTurnTtfts: number[] = []
  const firstTurnTtfts: number[] = []
  const started = performance.now()
  await Promise.all(Array.from({ length: G.sessions }, async (_, s) => {
    // the same text and think times for every contender
    const random = seeded(1000 + s)
    const messages: Message[] = [{ role: 'system', content: words(random, G.systemTokens) }]
    for (let turn = 1; turn <= G.turns; turn++) {
      messages.push({ role: 'user', content: tagged(`s${s}`, words(random, G.userTokens)) })
      const answer = await streamChat(route(s), G.model, messages)
      ;(turn === 1 ? firstTurnTtfts : laterTurnTtfts).push(answer.ttftMs)
      messages.push({ role: 'assistant', content: answer.content })
      if (turn < G.turns) await sleep(G.thinkMs[0] + random() * (G.thinkMs[1] - G.thinkMs[0]))
    }
  }))
  return { laterTurnTtfts, firstTurnTtfts, workloadMs: performance.now() - started }
}

/**
 * The least any server could compute: each conversation's tokens once, that is its last (longest)
 * prompt less the answers inside it, which were generated, not prefilled.
 */
function minimumTokens (run: ContenderRun<SessionsResult>): number {
  const bySession = new Map<string, { longest: number, lastAnswer: number, answers: number }>()
  for (const r of run.costs.records) {
    if (r.tag === undefined) throw new Error(`(g) ${run.contender}: a request without its session's tag`)
    const s = bySession.get(r.tag) ?? { longest: 0, lastAnswer: 0, answers: 0 }
    s.answers += r.evalCount
    if (r.promptTokens > s.longest) { s.longest = r.promptTokens; s.lastAnswer = r.evalCount }
    bySession.set(r.tag, s)
  }
  if (bySession.size !== G.sessions) throw new Error(`(g) ${run.contender}: ${bySession.size} sessions seen by the servers, not ${G.sessions}`)
  return [...bySession.values()].reduce((n, s) => n + s.longest - (s.answers - s.lastAnswer), 0)
}

async function run (ctx: SchedulingContext): Promise<void> {
  const { lines, goals, summary } = ctx.report
  const runs: Array<ContenderRun<SessionsResult>> = []
  for (const contender of CONTENDERS) {
    process.stderr.write(`bench: (g) agent sessions, ${contender}\n`)
    runs.push(await runContender(ctx, 'g', contender,
      { servers: G.servers, models: [G.model], cost: G.cost, tokens: G.answerTokens },
      { model: G.model },
      sessions))
  }
  const rows = runs.map((r) => {
    const t = r.result.laterTurnTtfts
    const minimum = minimumTokens(r)
    return {
      contender: r.contender,
      ttftP50Ms: percentile(t, 50),
      ttftP90Ms: percentile(t, 90),
      ttftP99Ms: percentile(t, 99),
      firstTurnTtftP50Ms: percentile(r.result.firstTurnTtfts, 50),
      computedTokens: r.costs.computedPromptTokens,
      minimumTokens: minimum,
      computedRatio: r.costs.computedPromptTokens / minimum,
      workloadS: r.result.workloadMs / 1000
    }
  })
  const byName = new Map(rows.map((r) => [r.contender, r]))
  const gateway = byName.get('gateway')!
  const nginx = [byName.get('nginx round-robin')!, byName.get('nginx least_conn')!]
  const betterTtftP90 = Math.min(...nginx.map((r) => r.ttftP90Ms))
  const betterWorkload = Math.min(...nginx.map((r) => r.workloadS))
  summary.g = {
    servers: G.servers, sessions: G.sessions, turns: G.turns, systemTokens: G.systemTokens, userTokens: G.userTokens, cost: G.cost,
    contenders: rows.map((r) => ({
      ...r,
      ttftP50Ms: +fmt(r.ttftP50Ms, 1), ttftP90Ms: +fmt(r.ttftP90Ms, 1), ttftP99Ms: +fmt(r.ttftP99Ms, 1), firstTurnTtftP50Ms: +fmt(r.firstTurnTtftP50Ms, 1),
      computedRatio: +fmt(r.computedRatio), workloadS: +fmt(r.workloadS)
    }))
  }
  lines.push(
    `(g) agent sessions: ${G.servers} servers of one model (1 slot + ${G.cost.ramCacheEntries} prompt states in RAM each, prefill ${G.cost.prefillMsPerToken} ms/token), ${G.sessions} sessions × ${G.turns} turns, ~${G.systemTokens.toLocaleString('en')}-token system prompts, ~${G.userTokens} tokens per turn`,
    '                        TTFT turns 2–6 ms: p50      p90      p99   computed / minimum tokens   workload s',
    ...rows.map((r) => `  ${r.contender.padEnd(20)} ${fmt(r.ttftP50Ms, 1).padStart(20)} ${fmt(r.ttftP90Ms, 1).padStart(8)} ${fmt(r.ttftP99Ms, 1).padStart(8)}   ${`${r.computedTokens} / ${r.minimumTokens} = ${fmt(r.computedRatio)}×`.padStart(25)}   ${fmt(r.workloadS).padStart(10)}`),
    '  (gateway: two replicas, each request to either at random; sticky: each session pinned to one server by the client, the reference)',
    ''
  )
  goals.push(
    { goal: 'agent sessions, TTFT p90 / better nginx (g)', target: `≤ ${G.goals.ttftP90Ratio}×`, reached: `${fmt(gateway.ttftP90Ms / betterTtftP90)}×`, pass: gateway.ttftP90Ms / betterTtftP90 <= G.goals.ttftP90Ratio },
    { goal: 'agent sessions, computed / minimum tokens (g)', target: `≤ ${G.goals.computedRatio}×`, reached: `${fmt(gateway.computedRatio)}×`, pass: gateway.computedRatio <= G.goals.computedRatio },
    { goal: 'agent sessions, workload time / better nginx (g)', target: `≤ ${G.goals.workloadRatio}×`, reached: `${fmt(gateway.workloadS / betterWorkload)}×`, pass: gateway.workloadS / betterWorkload <= G.goals.workloadRatio }
  )
}

export const scenario: Scenario = {
  letter: 'g',
  name: 'agent sessions',
  measures: '12 sessions × 6 turns with ~6,000-token system prompts on 4 cost-model servers: TTFT p50/p90/p99 of turns 2–6, computed / minimum prompt tokens, workload time; gateway vs nginx round-robin, least_conn, sticky',
  goal: 'TTFT p90 ≤ 0.5× better nginx; computed ≤ 1.3× minimum; done no later than nginx',
  run
}
