import uPlot from './uPlot.esm.js'

/*
 * The Usage view's two kinds of chart, both uPlot (served by the gateway from its package):
 * stacked bars (a value per series per time step) and a timeline (a row per GPU, a cell per
 * minute, stronger the busier). uPlot has neither built in: the bars are drawn over each other from
 * the tallest stack down, and the timeline's cells in a draw hook. Each legend shows, off the
 * chart, each series' total (or average) over the window, and under the cursor the value there.
 */

/** Distinct on the dark page, in the order names get them (grey, the last, is for the rest). */
const PALETTE = ['#388bfd', '#d29922', '#2ea043', '#a371f7', '#f85149', '#39c5cf', '#db61a2', '#e3b341', '#8b98a5']
const MUTED = PALETTE[PALETTE.length - 1]
const LINE = '#2a333d'
/** The page's colours of a leased and an idle GPU */
const BUSY_RGB = '210, 153, 34'
const IDLE = 'rgba(46, 160, 67, .22)'

const axis = (extra: uPlot.Axis = {}): uPlot.Axis => ({
  stroke: MUTED,
  grid: { stroke: LINE, width: 1 },
  ticks: { stroke: LINE, width: 1 },
  font: '12px system-ui, sans-serif',
  ...extra
})

/** The element's width for the chart, at least a phone's. */
const widthOf = (root: HTMLElement): number => Math.max(280, Math.floor(root.clientWidth))

/** A uPlot kept in `root`: made again when its series change, else given the new data. */
abstract class Chart<D> {
  protected plot?: uPlot
  protected data?: D
  private shape = ''
  private readonly resize = new ResizeObserver(() => {
    if (this.plot != null && this.plot.width !== widthOf(this.root)) this.plot.setSize({ width: widthOf(this.root), height: this.height() })
  })

  constructor (protected readonly root: HTMLElement) {
    this.resize.observe(root)
  }

  protected abstract height (): number
  /** What decides the chart's series (labels): a change makes a new chart. */
  protected abstract shapeOf (data: D): string
  protected abstract options (data: D): uPlot.Options
  protected abstract aligned (data: D): uPlot.AlignedData

  show (data: D): void {
    this.data = data
    const shape = this.shapeOf(data)
    if (this.plot != null && shape === this.shape) {
      this.plot.setData(this.aligned(data))
      return
    }
    this.plot?.destroy()
    this.shape = shape
    this.plot = new uPlot({ ...this.options(data), width: widthOf(this.root), height: this.height() }, this.aligned(data), this.root)
  }

  clear (): void {
    this.plot?.destroy()
    this.plot = undefined
    this.shape = ''
  }
}

export interface StackedData {
  /** the start of each step, in seconds */
  x: number[]
  stepSeconds: number
  /** `rest`: the sum of the series left out (drawn grey) */
  series: Array<{ label: string, values: number[], rest?: boolean }>
}

export interface StackedOptions {
  height: number
  /** a value in the legend: exact */
  format: (n: number) => string
  /** a value on the axis: short */
  short: (n: number) => string
  /** the time of one step in the legend */
  step: (seconds: number) => string
}

/** Stacked bars: series 0 on top of the stack, the last one at the bottom. */
export class StackedBars extends Chart<StackedData> {
  /** A name keeps its colour while the page is open, whatever its rank or the window. */
  private readonly colors = new Map<string, string>()

  constructor (root: HTMLElement, private readonly opts: StackedOptions) { super(root) }

  private colorOf (series: StackedData['series'][number]): string {
    if (series.rest === true) return MUTED
    let color = this.colors.get(series.label)
    if (color === undefined) this.colors.set(series.label, color = PALETTE[this.colors.size % (PALETTE.length - 1)])
    return color
  }

  protected height (): number { return this.opts.height }

  protected shapeOf (data: StackedData): string {
    return JSON.stringify(data.series.map((s) => s.label))
  }

  /** Each series' value is the sum of it and every series below it: drawn tallest first, each over the last. */
  protected aligned (data: StackedData): uPlot.AlignedData {
    const stacked: number[][] = []
    let below = new Array<number>(data.x.length).fill(0)
    for (let i = data.series.length - 1; i >= 0; i--) {
      below = data.series[i].values.map((v, k) => v + below[k])
      stacked[i] = below
    }
    return [data.x, ...stacked]
  }

  protected options (data: StackedData): uPlot.Options {
    // at least 2 px wide, so that 30 days of hours still show
    const bars = uPlot.paths.bars?.({ size: [0.85, 48, 2], align: 0, gap: 0 })
    const raw = (): StackedData => this.data ?? data
    return {
      width: 0,
      height: 0,
      legend: { live: true },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        // a bar is centred on its step's start: half a step of room on either side
        x: { time: true, range: (_u, min, max) => [min - raw().stepSeconds / 2, max + raw().stepSeconds / 2] },
        y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.08 : 1] }
      },
      axes: [
        axis(),
        axis({ size: 56, values: (_u, splits) => splits.map((v) => this.opts.short(v)) })
      ],
      series: [
        { label: 'Time', value: (_u, v) => v == null ? 'total' : this.opts.step(v) },
        ...data.series.map((s): uPlot.Series => ({
          label: s.label,
          stroke: this.colorOf(s),
          fill: this.colorOf(s),
          width: 0,
          paths: bars,
          points: { show: false },
          value: (_u, _v, sidx, idx) => {
            const values = raw().series[sidx - 1]?.values ?? []
            return this.opts.format(idx == null ? values.reduce((a, b) => a + b, 0) : values[idx] ?? 0)
          }
        }))
      ]
    }
  }
}

export interface TimelineData {
  /** the start of each cell, in seconds */
  x: number[]
  stepSeconds: number
  /** one row per GPU, top to bottom: each cell's busy share (0 to 1), null where unknown */
  rows: Array<{ label: string, values: Array<number | null> }>
}

const percent = (v: number | null | undefined): string => v == null ? 'unknown' : `${Math.round(v * 100)}%`

/** The mean of the known cells. */
export function meanOf (values: Array<number | null>): number | null {
  const known = values.filter((v): v is number => v != null)
  return known.length === 0 ? null : known.reduce((a, b) => a + b, 0) / known.length
}

/** A row per GPU and a cell per step: green where it was idle, amber where busy (the more, the stronger), an outline where unknown. */
export class Timeline extends Chart<TimelineData> {
  constructor (root: HTMLElement, private readonly opts: { step: (seconds: number) => string }) { super(root) }

  protected height (): number {
    return 60 + 30 * Math.max(1, this.data?.rows.length ?? 1)
  }

  protected shapeOf (data: TimelineData): string {
    return JSON.stringify(data.rows.map((r) => r.label))
  }

  protected aligned (data: TimelineData): uPlot.AlignedData {
    return [data.x, ...data.rows.map((r) => r.values)]
  }

  protected options (data: TimelineData): uPlot.Options {
    const raw = (): TimelineData => this.data ?? data
    const n = Math.max(1, data.rows.length)
    return {
      width: 0,
      height: 0,
      legend: { live: true },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: (_u, min, max) => [min, max + raw().stepSeconds] },
        y: { auto: false, range: [0, n] }
      },
      axes: [
        axis(),
        axis({
          size: 110,
          grid: { show: false },
          ticks: { show: false },
          splits: () => data.rows.map((_, i) => n - i - 0.5),
          values: () => data.rows.map((r) => r.label)
        })
      ],
      series: [
        { label: 'Minute', value: (_u, v) => v == null ? 'hour mean' : this.opts.step(v) },
        ...data.rows.map((r): uPlot.Series => ({
          label: r.label,
          stroke: `rgb(${BUSY_RGB})`,
          fill: `rgba(${BUSY_RGB}, .6)`,
          paths: () => null,
          points: { show: false },
          value: (_u, v, sidx, idx) => percent(idx == null ? meanOf(raw().rows[sidx - 1]?.values ?? []) : v)
        }))
      ],
      hooks: {
        draw: [(u) => {
          const { x, stepSeconds, rows } = raw()
          const ctx = u.ctx
          ctx.save()
          const gap = Math.max(1, Math.round(devicePixelRatio))
          rows.forEach((row, r) => {
            const top = u.valToPos(n - r, 'y', true)
            const bottom = u.valToPos(n - r - 1, 'y', true)
            const pad = (bottom - top) * 0.12
            x.forEach((t, k) => {
              const left = u.valToPos(t, 'x', true)
              const right = u.valToPos(t + stepSeconds, 'x', true)
              const v = row.values[k]
              const width = Math.max(1, right - left - gap)
              if (v == null) {
                // unknown: an outline only
                ctx.strokeStyle = LINE
                ctx.lineWidth = gap
                ctx.strokeRect(left + gap / 2, top + pad + gap / 2, width - gap, bottom - top - 2 * pad - gap)
                return
              }
              ctx.fillStyle = v === 0 ? IDLE : `rgba(${BUSY_RGB}, ${(0.35 + 0.65 * v).toFixed(3)})`
              ctx.fillRect(left, top + pad, width, bottom - top - 2 * pad)
            })
          })
          ctx.restore()
        }]
      }
    }
  }
}
