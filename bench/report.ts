/** What every scenario prints: its lines, rows of the goal table, and its part of the `BENCH_JSON` line. */

export interface Goal {
  goal: string
  target: string
  reached: string
  pass: boolean
}

/** What the scenarios of one run write into. */
export interface Report {
  /** the text, scenario after scenario */
  lines: string[]
  goals: Goal[]
  /** the `BENCH_JSON` line's object */
  summary: Record<string, unknown>
}

export const fmt = (n: number, digits = 2): string => Number.isFinite(n) ? n.toFixed(digits) : '—'

/** The header, every scenario's lines, the goal table and the `BENCH_JSON` line, on stdout. */
export function printReport (header: string, report: Report): void {
  const { lines, goals, summary } = report
  process.stdout.write([header, '', ...lines].join('\n') + '\n')
  if (goals.length > 0) {
    const w = Math.max(...goals.map((g) => g.goal.length))
    process.stdout.write(`${'goal'.padEnd(w)}  ${'target'.padEnd(9)}  ${'reached'.padEnd(10)}  result\n`)
    for (const g of goals) process.stdout.write(`${g.goal.padEnd(w)}  ${g.target.padEnd(9)}  ${g.reached.padEnd(10)}  ${g.pass ? 'pass' : 'FAIL'}\n`)
    summary.goals = goals
  }
  process.stdout.write(`BENCH_JSON ${JSON.stringify(summary)}\n`)
}
